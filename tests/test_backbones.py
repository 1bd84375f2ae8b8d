import pytest
import torch
from torch.nn import functional as F

from common.model.backbones import DomainInputs, LightRecommender, mlp_contributes, pad_histories, shared_state
from common.model.config import BackboneConfig


@pytest.fixture
def light():
    torch.manual_seed(0)
    cfg = BackboneConfig(kind="light", dim=None, layers=2, heads=2, dropout=0.0, max_items=8)
    feats = F.normalize(torch.randn(30, 16), dim=-1)
    return LightRecommender(cfg, feature_dim=16), DomainInputs("d", 30, features=feats)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_pad_histories_right_aligned_and_truncated():
    h = pad_histories([[1, 2, 3], [4], list(range(20))], max_items=5)
    assert h.tolist() == [[-1, -1, 1, 2, 3], [-1, -1, -1, -1, 4], [15, 16, 17, 18, 19]]


def test_untrained_light_model_scores_by_last_item_text(light):
    model, dom = light
    model.eval()
    hist = pad_histories([[3, 7, 9], [5]], 8)
    emb = model(dom, "histories", hist)
    assert torch.allclose(emb, dom.features[[9, 5]], atol=1e-5)  # dim == F: exact identity
    assert torch.allclose(model(dom, "items", torch.tensor([4])), dom.features[[4]], atol=1e-6)


def test_light_model_is_causal_and_padding_invariant(light):
    model, dom = light
    _perturb(model)
    model.eval()
    a = model(dom, "positions", torch.tensor([[1, 2, 3, 4]]))
    b = model(dom, "positions", torch.tensor([[1, 2, 9, 8]]))
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)
    assert not torch.allclose(a[:, 2:], b[:, 2:], atol=1e-4)
    short = model(dom, "histories", torch.tensor([[1, 2, 3]]))
    padded = model(dom, "histories", torch.tensor([[-1, -1, 1, 2, 3]]))
    assert torch.allclose(short, padded, atol=1e-5)
    assert torch.allclose(short, a[:, 2], atol=1e-5)
    assert torch.allclose(short.norm(dim=-1), torch.ones(1))


def test_functional_call_with_shared_state_matches_module(light):
    model, dom = light
    _perturb(model)
    model.eval()
    hist = pad_histories([[1, 2], [3, 4, 5]], 8)
    params = shared_state(model)
    direct = model(dom, "histories", hist)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    via = torch.func.functional_call(model, params, (dom, "histories", hist))
    assert torch.allclose(direct, via, atol=1e-6)


def test_layer_groups(light):
    model, _ = light
    groups = {model.layer_of(n) for n, _ in model.named_parameters()}
    assert groups == {"adaptor", "position", "layer0", "layer1"}


def test_narrow_adaptor_roughly_preserves_text_similarity():
    torch.manual_seed(0)
    centers = torch.randn(10, 384)  # clustered, like text embeddings: cosines spread over [-0.2, 1]
    feats = F.normalize(centers[torch.arange(200) % 10] + 0.7 * torch.randn(200, 384), dim=-1)
    model = LightRecommender(BackboneConfig(kind="light", dim=128, dropout=0.0), feature_dim=384).eval()
    dom = DomainInputs("d", 200, features=feats)
    emb = model(dom, "items", torch.arange(200))
    before = feats @ feats.T
    after = emb @ emb.T
    off = ~torch.eye(200, dtype=torch.bool)
    corr = torch.corrcoef(torch.stack([before[off], after[off]]))[0, 1]
    assert corr > 0.9


@pytest.mark.slow
def test_base_is_bit_identical_whatever_the_thread_count():
    """Silos run with other thread counts than the server (Ray gives each 1 CPU): same fingerprint."""
    import subprocess
    import sys

    code = ("import torch,sys; torch.set_num_threads(int(sys.argv[1]));"
            "from common.model.backbones import LightRecommender, shared_state; from common.model.config import BackboneConfig;"
            "from common.merging.task_vectors import fingerprint; torch.manual_seed(0);"
            "print(fingerprint(shared_state(LightRecommender(BackboneConfig(), 384))))")
    fps = {subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, check=True).stdout
           for n in (1, 2)}
    assert len(fps) == 1


def test_untrained_text_encoder_items_equal_cached_item_embeddings(tmp_path):
    """The core benchmark scores the untrained encoder with the cached frozen item-text embeddings: they must be
    what the text backbone itself computes (same text, truncation, pooling), and evaluation must agree."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_tiny_encoder

    from common.model.backbones import build_backbone, encode_all_items
    from common.data.format import load_silo
    from common.data.demo import make_demo
    from common.model.item_cache import item_text_embeddings
    from common.model.train import evaluate_split

    enc = str(make_tiny_encoder(tmp_path / "enc"))
    silo = load_silo(make_demo(tmp_path / "demo", n_domains=1, n_items=60, n_users=40, seed=1)[0])
    cfg = BackboneConfig(kind="text", encoder=enc, cache_dir=tmp_path / "cache")
    model = build_backbone(cfg).eval()
    dom = model.domain_inputs(silo.catalog)
    cached = item_text_embeddings(silo.catalog, encoder=enc, value_tokens=cfg.item_value_tokens,
                                  max_tokens=cfg.item_max_tokens, cache_dir=cfg.cache_dir, precision="float32",
                                  progress=False)
    with torch.no_grad():
        own = encode_all_items(model, dom)
    assert torch.allclose(own, cached, atol=1e-5)
    assert evaluate_split(model, silo, dom, "test", item_embeddings=cached) == evaluate_split(model, silo, dom, "test")
    with pytest.raises(ValueError, match="item embeddings"):
        evaluate_split(model, silo, dom, "test", item_embeddings=cached[:-1])


def test_bfloat16_item_embeddings_are_close_to_float32_and_cached_apart(tmp_path, monkeypatch):
    """Encoder precision: "auto" follows the hardware (bfloat16 only with native bfloat16 dot products); a
    bfloat16 embedding stays within cosine 0.999 of float32's; the two never share a cache file."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_tiny_encoder

    from common.data.demo import make_demo
    from common.data.format import load_silo
    from common.model import encoder as encoder_mod
    from common.model.item_cache import item_text_embeddings

    monkeypatch.setattr(encoder_mod, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert encoder_mod.resolve_precision("auto", "cpu") == "float32"
    monkeypatch.setattr(encoder_mod, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert encoder_mod.resolve_precision("auto", "cpu") == "bfloat16"
    assert encoder_mod.resolve_precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="encoder precision"):
        encoder_mod.resolve_precision("fp16")

    enc = str(make_tiny_encoder(tmp_path / "enc"))
    catalog = load_silo(make_demo(tmp_path / "demo", n_domains=1, n_items=60, n_users=40, seed=1)[0]).catalog
    cache = tmp_path / "cache"
    kw = dict(encoder=enc, value_tokens=32, max_tokens=128, cache_dir=cache, progress=False)
    full = item_text_embeddings(catalog, precision="float32", **kw)
    low = item_text_embeddings(catalog, precision="bfloat16", **kw)
    assert len(list(cache.iterdir())) == 2  # one file per precision
    cos = (full * low).sum(-1)
    assert low.dtype == torch.float32 and not torch.equal(full, low) and cos.min() > 0.999
    assert torch.equal(item_text_embeddings(catalog, precision="auto", **kw), low)  # "auto" -> bfloat16 here, cached


def test_center_items_subtracts_the_catalog_mean_and_new_items_keep_the_indexed_catalogs_mean():
    from common.model.backbones import LightRecommender
    from common.data.format import CatalogView, ItemMeta
    from common.model.config import BackboneConfig

    torch.manual_seed(0)
    feats = F.normalize(torch.randn(6, 8) + 2.0, dim=-1)  # a strong shared direction, as real catalogs have
    cat = CatalogView("d", tuple(f"k{i}" for i in range(6)), tuple(ItemMeta(title=f"t{i}") for i in range(6)))
    plain = LightRecommender(BackboneConfig(dim=None, center_items=False), 8).domain_inputs(cat, features=feats)
    assert torch.equal(plain.features, feats) and plain.feature_mean is None
    model = LightRecommender(BackboneConfig(dim=None, center_items=True), 8)
    dom = model.domain_inputs(cat, features=feats)
    assert torch.allclose(dom.feature_mean, feats.mean(0))
    assert torch.allclose(dom.features, F.normalize(feats - feats.mean(0), dim=-1))
    new = CatalogView("d", ("n0",), (ItemMeta(title="t0"),))
    extra = model.domain_inputs(new, features=feats[:1], center_like=dom)
    assert torch.allclose(extra.features, dom.features[:1])  # the same item text gets the same feature


def test_zero_frozen_item_mlp_is_skipped_with_the_same_numbers():
    """The MLP residual at zero and not trained (every silo, every model before the server's fit) is skipped: the
    item tower's output is bit-identical to computing it; trained or non-zero, it is computed."""
    torch.manual_seed(0)
    model = LightRecommender(BackboneConfig(kind="light", dim=16, heads=2, layers=1, max_items=8, adaptor_hidden=32),
                             feature_dim=12)
    dom = DomainInputs("d", 20, features=F.normalize(torch.randn(20, 12), dim=-1))
    ids = torch.arange(20)
    x = dom.features[ids]
    full = lambda: F.normalize(model.adaptor(x) + model.adaptor_mlp(x), dim=-1)  # noqa: E731
    with torch.no_grad():
        assert not mlp_contributes(model.adaptor_mlp)
        assert torch.equal(model(dom, "items", ids), full())
    assert mlp_contributes(model.adaptor_mlp)  # grad mode, trainable last layer: computed, so the fit can train it
    for p in model.adaptor_mlp.parameters():
        p.requires_grad_(False)
    assert not mlp_contributes(model.adaptor_mlp)  # a silo: frozen at zero
    with torch.no_grad():
        model.adaptor_mlp[2].bias[3] = 0.5
        assert mlp_contributes(model.adaptor_mlp)  # a fitted residual always counts
        assert torch.equal(model(dom, "items", ids), full())
        assert not torch.equal(model(dom, "items", ids), F.normalize(model.adaptor(x), dim=-1))


def test_encoder_width_reads_the_config_and_a_warm_light_backbone_never_imports_transformers(tmp_path, world):
    """The light backbone's width comes from the encoder folder's config.json (what AutoConfig says), falling back
    to AutoConfig when the file names it otherwise; with the item cache warm, building the backbone and its
    domain inputs in a fresh process (a ClientApp's per-message work) imports no transformers."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoConfig

    from common.data.format import load_silo
    from common.model.backbones import build_backbone
    from common.model.encoder import encoder_width

    root, enc, dirs = world
    assert encoder_width(str(enc)) == AutoConfig.from_pretrained(str(enc)).hidden_size
    other = shutil.copytree(enc, tmp_path / "enc")  # no hidden_size in the file: AutoConfig decides (BERT's default)
    cfg_file = other / "config.json"
    cfg_file.write_text(json.dumps({k: v for k, v in json.loads(cfg_file.read_text()).items() if k != "hidden_size"}))
    assert encoder_width(str(other)) == AutoConfig.from_pretrained(str(other)).hidden_size != encoder_width(str(enc))

    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    build_backbone(bb).domain_inputs(load_silo(dirs[0]).catalog)  # warms the cache (if no test did)
    code = ("import sys; from common.model.backbones import build_backbone; from common.model.config import "
            "BackboneConfig; from common.data.format import load_silo; "
            f"bb = BackboneConfig(kind='light', encoder={str(enc)!r}, layers=1, heads=2, "
            f"cache_dir={str(root / 'cache')!r}); "
            f"build_backbone(bb).domain_inputs(load_silo({str(dirs[0])!r}).catalog); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
