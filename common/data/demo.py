"""Synthetic demo domains with a latent structure that item text reveals and that all domains share.

Eight style themes ("vintage", "neon", "rustic", ...) are shared by every domain; each theme has a few
style words and a few brands. A domain brings its own product nouns grouped into subcategories. An item has
one theme: its title mixes theme words with a domain noun, its brand is mostly one of the theme's brands,
its category is "<Domain> <subcategory>". A user prefers one or two themes (some switch to a new theme
late in their history) and picks items of the preferred theme(s) most of the time, with popularity skew
and some noise. So a model that reads item text and the recent history beats popularity clearly, and what
it learns about themes in one domain carries over to the others.

    python -m common.data.demo --out .cache/demo-data [--domains 3] [--items 300] [--users 600] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common.data.format import CatalogView, ItemMeta, write_domain

THEMES: dict[str, dict[str, list[str]]] = {
    "vintage": {"words": ["Vintage", "Retro", "Antique", "Heritage", "Classic", "Old-Fashioned"],
                "brands": ["Oldtown Co", "Heirloom Works", "Grandpa's Attic"]},
    "neon": {"words": ["Neon", "Electric", "Glow", "Fluorescent", "Vivid", "Bright"],
             "brands": ["GlowLab", "Voltage", "Lumina Pop"]},
    "rustic": {"words": ["Rustic", "Farmhouse", "Reclaimed", "Barnwood", "Weathered", "Timber"],
               "brands": ["Barn & Field", "Cedar Hollow", "Prairie Goods"]},
    "minimal": {"words": ["Minimal", "Sleek", "Simple", "Slim", "Clean-Line", "Modern"],
                "brands": ["Form", "Basis", "Plainly"]},
    "tropical": {"words": ["Tropical", "Palm", "Island", "Coconut", "Lagoon", "Hibiscus"],
                 "brands": ["Aloha Supply", "Tiki Coast", "Palmera"]},
    "arctic": {"words": ["Arctic", "Frost", "Polar", "Glacier", "Snowy", "Icy"],
               "brands": ["NorthPeak", "Tundra Gear", "Polaris"]},
    "royal": {"words": ["Royal", "Regal", "Velvet", "Gilded", "Imperial", "Luxe"],
              "brands": ["Crown & Crest", "Majesty", "Sovereign"]},
    "cosmic": {"words": ["Cosmic", "Galaxy", "Stellar", "Lunar", "Nebula", "Orbit"],
               "brands": ["Starfield", "AstroHome", "Nova Labs"]},
}

DOMAINS: dict[str, dict[str, list[str]]] = {
    "garden": {"Planters": ["Planter", "Flower Pot", "Window Box", "Hanging Basket"],
               "Tools": ["Trowel", "Pruning Shears", "Garden Rake", "Hand Fork"],
               "Watering": ["Watering Can", "Garden Hose", "Sprinkler", "Hose Nozzle"],
               "Decor": ["Bird Feeder", "Wind Chime", "Garden Gnome", "Stepping Stone"],
               "Lighting": ["Solar Lantern", "String Lights", "Path Light", "Torch"]},
    "kitchen": {"Cookware": ["Frying Pan", "Saucepan", "Dutch Oven", "Wok"],
                "Tableware": ["Dinner Plate", "Mug", "Serving Bowl", "Tumbler"],
                "Utensils": ["Spatula", "Whisk", "Ladle", "Tongs"],
                "Storage": ["Spice Rack", "Bread Box", "Canister Set", "Lunch Box"],
                "Linens": ["Apron", "Tea Towel", "Oven Mitt", "Placemat"]},
    "outdoor": {"Camping": ["Tent", "Sleeping Bag", "Camp Chair", "Hammock"],
                "Hiking": ["Backpack", "Water Bottle", "Trekking Poles", "Headlamp"],
                "Cooking": ["Camp Stove", "Cooler", "Grill", "Coffee Percolator"],
                "Apparel": ["Rain Jacket", "Beanie", "Fleece Vest", "Bandana"],
                "Gear": ["Compass", "Multitool", "Dry Bag", "Binoculars"]},
    "toys": {"Plush": ["Teddy Bear", "Plush Unicorn", "Stuffed Dinosaur", "Bunny Plush"],
             "Building": ["Building Blocks", "Marble Run", "Construction Set", "Magnetic Tiles"],
             "Games": ["Board Game", "Puzzle", "Card Game", "Dominoes"],
             "Vehicles": ["Toy Car", "Train Set", "Rocket Ship", "Race Track"],
             "Crafts": ["Bead Kit", "Crayon Set", "Sticker Book", "Play Dough"]},
    "books": {"Journals": ["Notebook", "Diary", "Sketchbook", "Planner"],
              "Fiction": ["Novel", "Short Stories", "Mystery Novel", "Fairy Tale Collection"],
              "Cooking": ["Cookbook", "Baking Guide", "Recipe Collection", "Cocktail Book"],
              "Kids": ["Picture Book", "Coloring Book", "Pop-Up Book", "Bedtime Stories"],
              "Art": ["Art Print Book", "Photo Album", "Poster Collection", "Design Annual"]},
}

EXTRAS = ["", "", "", "Set of 2", "Large", "Small", "Deluxe", "Mini", "Premium", "Handmade", "XL", "Gift Edition"]

P_THEME_WORD_NOISE = 0.15   # a title word borrowed from another theme
P_BRAND_ON_THEME = 0.8      # the brand belongs to the item's theme
P_FOLLOW_THEME = 0.85       # a user's pick follows a preferred theme
P_TWO_THEMES = 0.3
P_SWITCH = 0.25             # the user moves to a new theme late in the history
POPULARITY_EXPONENT = 0.7


def _items(rng: np.random.Generator, domain: str, n_items: int) -> tuple[list[str], list[ItemMeta], np.ndarray]:
    theme_names = list(THEMES)
    subcats = DOMAINS[domain]
    sub_names = list(subcats)
    all_brands = [b for t in theme_names for b in THEMES[t]["brands"]]
    themes = rng.integers(len(theme_names), size=n_items)
    keys, metas = [], []
    prefix = domain[:3].upper()
    for idx in range(n_items):
        theme = THEMES[theme_names[themes[idx]]]
        n_words = 1 + int(rng.random() < 0.6)
        words = [str(w) for w in rng.choice(theme["words"], size=n_words, replace=False)]
        if rng.random() < P_THEME_WORD_NOISE:
            other = THEMES[theme_names[rng.integers(len(theme_names))]]["words"]
            words[-1] = str(other[rng.integers(len(other))])
        sub = sub_names[rng.integers(len(sub_names))]
        noun = subcats[sub][rng.integers(len(subcats[sub]))]
        extra = EXTRAS[rng.integers(len(EXTRAS))]
        title = " ".join(p for p in (*words, noun, extra) if p)
        if rng.random() < P_BRAND_ON_THEME:
            brand = theme["brands"][rng.integers(len(theme["brands"]))]
        else:
            brand = all_brands[rng.integers(len(all_brands))]
        if rng.random() < 0.05:
            brand = ""  # real catalogs have empty brands
        keys.append(f"{prefix}{idx:05d}")
        metas.append(ItemMeta(title=title, brand=brand, category=f"{domain.capitalize()} {sub}"))
    return keys, metas, themes


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights)
    return c / c[-1]


def _users(rng: np.random.Generator, themes: np.ndarray, n_users: int) -> list[list[int]]:
    n_items, n_themes = len(themes), len(THEMES)
    popularity = 1.0 / (1.0 + rng.permutation(n_items)) ** POPULARITY_EXPONENT
    global_cdf = _cdf(popularity)
    members = [np.flatnonzero(themes == k) for k in range(n_themes)]
    theme_cdf = [_cdf(popularity[m]) if len(m) else None for m in members]
    usable = [k for k in range(n_themes) if len(members[k])]

    def draw(pref: list[int], size: int) -> list[int]:
        """`size` popularity-weighted picks: from a preferred theme with P_FOLLOW_THEME, else from anything."""
        follow = rng.random(size) < P_FOLLOW_THEME
        which = np.asarray(pref)[rng.integers(len(pref), size=size)]
        u = rng.random(size)
        picks = np.searchsorted(global_cdf, u, side="right").clip(max=n_items - 1)
        for k in set(which[follow].tolist()):
            sel = follow & (which == k)
            pos = np.searchsorted(theme_cdf[k], u[sel], side="right").clip(max=len(members[k]) - 1)
            picks[sel] = members[k][pos]
        return picks.tolist()

    def fill(seq: list[int], seen: set[int], pref: list[int], count: int) -> None:
        target = len(seq) + count
        for _ in range(8):  # vectorised rounds of draws; an item is picked at most once per user
            for item in draw(pref, 2 * (target - len(seq))):
                if item not in seen:
                    seq.append(item)
                    seen.add(item)
                    if len(seq) == target:
                        return
        while len(seq) < target:  # tiny catalogs only: allow repeats
            seq.append(draw(pref, 1)[0])

    sequences = []
    for _ in range(n_users):
        length = int(rng.integers(5, 21))
        n_pref = 2 if (rng.random() < P_TWO_THEMES and len(usable) > 1) else 1
        pref = [usable[k] for k in rng.choice(len(usable), size=n_pref, replace=False)]
        switch_at, later = length, pref
        if rng.random() < P_SWITCH and len(usable) > n_pref:
            switch_at = int(rng.integers(length // 2, length - 1))
            rest = [k for k in usable if k not in pref]
            later = [rest[rng.integers(len(rest))]]
        seq: list[int] = []
        seen: set[int] = set()
        fill(seq, seen, pref, switch_at)
        fill(seq, seen, later, length - switch_at)
        sequences.append(seq)
    return sequences


def make_domain(out_dir: str | Path, domain: str, n_items: int = 300, n_users: int = 600, seed: int = 0) -> Path:
    """Generate one demo domain into `out_dir/domain`."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown demo domain {domain!r} (known: {', '.join(DOMAINS)})")
    if n_items < 3 or n_users < 1:
        raise ValueError(f"need at least 3 items and 1 user, got {n_items} items and {n_users} users")
    rng = np.random.default_rng([seed, list(DOMAINS).index(domain)])
    keys, metas, themes = _items(rng, domain, n_items)
    sequences = _users(rng, themes, n_users)
    catalog = CatalogView(domain=domain, item_keys=tuple(keys), items=tuple(metas))
    user_keys = [f"{domain[:3].upper()}-U{u:05d}" for u in range(n_users)]
    path = Path(out_dir) / domain
    write_domain(path, catalog, user_keys, [s[:-2] for s in sequences], [s[-2] for s in sequences],
                 [s[-1] for s in sequences])
    return path


def make_demo(out_dir: str | Path, n_domains: int = 3, n_items: int = 300, n_users: int = 600,
              seed: int = 0) -> list[Path]:
    """Generate the first `n_domains` demo domains (garden, kitchen, outdoor, toys, books) under `out_dir`."""
    names = list(DOMAINS)
    if not 1 <= n_domains <= len(names):
        raise ValueError(f"n_domains must be 1..{len(names)}, got {n_domains}")
    return [make_domain(out_dir, name, n_items, n_users, seed) for name in names[:n_domains]]


DEFAULT_ROOT = ".cache/demo-data"  # the app's default data-root: missing demo domains there are generated


def ensure_demo(root: str | Path, domains: list[str]) -> list[Path]:
    """Generate each of `domains` that is missing under `root` (demo defaults), holding a lock so silos that
    start together do not write the same files. Returns the folders generated (none when all exist)."""
    import fcntl

    root = Path(root)
    missing = [d for d in domains if not (root / d / "smap.json").exists()]
    if not missing:
        return []
    unknown = [d for d in missing if d not in DOMAINS]
    if unknown:
        raise ValueError(f"{root}: no data for {', '.join(unknown)}, and they are not demo domains "
                         f"({', '.join(DOMAINS)})")
    root.mkdir(parents=True, exist_ok=True)
    made = []
    with open(root / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for d in missing:
            if not (root / d / "smap.json").exists():  # another silo may have written it meanwhile
                made.append(make_domain(root, d))
    return made


def main(argv: list[str] | None = None, prog: str = "python -m common.data.demo") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="write synthetic demo domains (one folder each, the data "
                                 "format of docs/data.md)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the domain folders into")
    ap.add_argument("--domains", type=int, default=3, help=f"how many domains (1..{len(DOMAINS)}; default 3)")
    ap.add_argument("--items", type=int, default=300, help="items per domain (default 300)")
    ap.add_argument("--users", type=int, default=600, help="users per domain (default 600)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data; default 0)")
    args = ap.parse_args(argv)
    for path in make_demo(args.out, args.domains, args.items, args.users, args.seed):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
