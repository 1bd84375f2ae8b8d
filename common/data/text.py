"""Item text and sequence text, cut by tokens but keeping the original characters.

Item text:     "title: <t> brand: <b> category: <c>", each value cut to its first `max_value_tokens` tokens.
Sequence text: the history's item texts, most recent first, at most `max_items` of them, joined by "; ",
               cut from the oldest end (= the end of the string) to at most `max_tokens` tokens.

Cuts use the fast tokenizer's character offsets (no special tokens), so the kept text is a prefix of the
original string: case, accents and spacing survive (decoding token ids would lowercase them). Every function
that handles many texts makes one batched tokenizer call per field, never one call per text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from common.data.format import CatalogView, ItemMeta

SEPARATOR = "; "
DEFAULT_VALUE_TOKENS = 32
DEFAULT_MAX_ITEMS = 50


def _offsets(tokenizer, texts: list[str]) -> list[list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast (Rust) tokenizer is needed: character offsets come from it")
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # the Rust tokenizer directly: same tokens, less wrapper overhead, no "longer than 512" warning
        return [e.offsets for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False, truncation=False)
    return enc["offset_mapping"]


def _cut_point(offsets: list[tuple[int, int]], max_tokens: int) -> int | None:
    """Character index where the first `max_tokens` tokens end; None if the text already fits."""
    if len(offsets) <= max_tokens:
        return None
    if max_tokens <= 0:
        return 0
    return max(end for _, end in offsets[:max_tokens])


def truncate_texts(texts: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Each text cut to its first `max_tokens` tokens (no special tokens), original characters kept."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    out = list(texts)
    for i, offs in enumerate(_offsets(tokenizer, out)):
        cut = _cut_point(offs, max_tokens)
        if cut is not None:
            out[i] = out[i][:cut]
    return out


def _format_item(title: str, brand: str, category: str) -> str:
    return f"title: {title} brand: {brand} category: {category}"


def item_text(meta: ItemMeta, tokenizer, max_value_tokens: int = DEFAULT_VALUE_TOKENS) -> str:
    """ "title: <t> brand: <b> category: <c>" with each value cut to `max_value_tokens` tokens."""
    title, brand, category = truncate_texts([meta.title, meta.brand, meta.category], tokenizer, max_value_tokens)
    return _format_item(title, brand, category)


def catalog_texts(catalog: CatalogView, tokenizer, max_value_tokens: int = DEFAULT_VALUE_TOKENS) -> list[str]:
    """The item text of every catalog item (index = item id); one tokenizer call per field."""
    items = catalog.items
    titles = truncate_texts([m.title for m in items], tokenizer, max_value_tokens)
    brands = truncate_texts([m.brand for m in items], tokenizer, max_value_tokens)
    categories = truncate_texts([m.category for m in items], tokenizer, max_value_tokens)
    return [_format_item(t, b, c) for t, b, c in zip(titles, brands, categories)]


def _joined(recent: list[str]) -> tuple[str, set[int], int]:
    """Join by SEPARATOR; also where each separator starts and where the last text starts."""
    seps, pos, last = set(), 0, 0
    for t in recent[:-1]:
        pos += len(t)
        seps.add(pos)
        pos += len(SEPARATOR)
    last = pos
    return SEPARATOR.join(recent), seps, last


def _prefix_items(recent: list[str], char_budget: int) -> int:
    """How many of the most recent texts to tokenize first: enough characters, plus one more text."""
    total = 0
    for k, t in enumerate(recent):
        total += len(t) + len(SEPARATOR)
        if total >= char_budget:
            return min(k + 2, len(recent))
    return len(recent)


def _sequence_batch(histories: list[Sequence[str]], tokenizer, max_tokens: int, max_items: int) -> list[str]:
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    recents = [list(h[-max_items:])[::-1] if len(h) else [] for h in histories]
    out: list[str] = [""] * len(recents)
    # Pass 1 tokenizes only a prefix of each joined string (a few items' worth of characters). Its cut is
    # exact when it falls before the last included item starts: a separator ("; ") is a hard token boundary,
    # so what follows it cannot change the tokens before it. Rows where that does not hold are redone in
    # full in pass 2. This keeps the tokenizer's work proportional to max_tokens, not to 50 items.
    budget = 5 * max_tokens + 32
    todo = [(i, _prefix_items(r, budget)) for i, r in enumerate(recents)]
    cut_rows = []
    for _ in range(2):
        if not todo:
            break
        joined = [_joined(recents[i][:k]) for i, k in todo]
        redo = []
        for (i, k), (text, seps, last), offs in zip(todo, joined, _offsets(tokenizer, [j[0] for j in joined])):
            partial = k < len(recents[i])
            cut = _cut_point(offs, max_tokens)
            if partial and (cut is None or cut > last):
                redo.append((i, len(recents[i])))
                continue
            if cut is None:
                out[i] = text
                continue
            if cut - 1 in seps:  # the cut fell just after a separator's ";": drop the dangling ";"
                cut -= 1
            out[i] = text[:cut].rstrip()
            cut_rows.append(i)
        todo = redo
    # A prefix cut at a token boundary re-tokenizes to the same tokens for WordPiece/BPE tokenizers; check
    # anyway (one batched call over the cut rows) and cut further where a tokenizer disagrees.
    for _ in range(4):
        if not cut_rows:
            break
        again = []
        for i, offs in zip(cut_rows, _offsets(tokenizer, [out[i] for i in cut_rows])):
            cut = _cut_point(offs, max_tokens)
            if cut is not None:
                out[i] = out[i][: min(cut, len(out[i]) - 1)].rstrip()
                again.append(i)
        cut_rows = again
    return out


def sequence_text(history_texts: Sequence[str], tokenizer, max_tokens: int,
                  max_items: int = DEFAULT_MAX_ITEMS) -> str:
    """Sequence text of one history given oldest first (see the module docstring)."""
    return _sequence_batch([history_texts], tokenizer, max_tokens, max_items)[0]


def sequence_texts(histories: list[list[int]], item_texts: Sequence[str], tokenizer, max_tokens: int,
                   max_items: int = DEFAULT_MAX_ITEMS) -> list[str]:
    """Sequence texts of many histories of item ids (oldest first); one tokenizer call for the batch."""
    n = len(item_texts)
    rows = []
    for h in histories:
        ids = list(h)[-max_items:] if max_items >= 1 else []
        for i in ids:
            if not 0 <= i < n:
                raise IndexError(f"item id {i} outside 0..{n - 1}")
        rows.append([item_texts[i] for i in ids])
    return _sequence_batch(rows, tokenizer, max_tokens, max_items)
