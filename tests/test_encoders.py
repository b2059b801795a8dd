"""Encoder registry, the EfficientNet-Lite weight mapping, hub errors offline, and the text encoders."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histomoe_core.encoders import (
    RANDOM_INIT, EncoderError, RandomInitWarning, VisionEncoder, create_encoder, create_text_encoder, list_encoders,
    metadata_text,
)
from histomoe_core.encoders.lite import (
    LITE_WEIGHTS, file_sha256, lite_model, lite_weights_path, load_lite_state_dict, map_lite_state_dict,
)
from histomoe_core.errors import HistoMoEError


# ------------------------------------------------------------------------------------------------ registry
def test_registry_lists_offline_encoders():
    assert {"tiny", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(list_encoders())


def test_tiny_encoder_meets_the_contract():
    enc = create_encoder("tiny")
    assert isinstance(enc, VisionEncoder) and isinstance(enc, torch.nn.Module)
    assert (enc.name, enc.embed_dim, enc.pretrained, enc.input_px) == ("tiny", 16, False, 224)
    assert enc.weights_id.startswith("tiny-seed0-")
    batch = np.zeros((3, 224, 224, 3), np.uint8)
    batch[1] = 255
    batch[2, ..., 0] = 51  # (51/255 - 0.5) / 0.5 = -0.6
    x = enc.preprocess(batch)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(1.0))
    assert torch.allclose(x[2, 0], torch.tensor(-0.6)) and torch.allclose(x[2, 1], torch.tensor(-1.0))
    with torch.inference_mode():
        z = enc(x)
    assert z.shape == (3, 16)
    # deterministic weights: a second instance gives the same features, another seed does not
    with torch.inference_mode():
        assert torch.equal(create_encoder("tiny")(x), z)
    assert create_encoder("tiny", seed=1).cache_id() != enc.cache_id()


def test_preprocess_rejects_bad_batches():
    enc = create_encoder("tiny")
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        enc.preprocess(np.zeros((2, 3, 8, 8), np.uint8))


def test_any_timm_name_is_random_init_and_says_so():
    with pytest.warns(RandomInitWarning, match="randomly initialised"):
        enc = create_encoder("resnet10t")
    assert enc.weights_id == RANDOM_INIT and not enc.pretrained and enc.embed_dim == 512
    assert "RANDOM INIT" in enc.describe()
    # seeded: the same seed gives the same weights (and cache identity), another seed differs
    with pytest.warns(RandomInitWarning):
        again = create_encoder("resnet10t")
        other = create_encoder("resnet10t", seed=3)
    assert again.cache_id() == enc.cache_id() != other.cache_id()
    with torch.inference_mode():
        assert enc(enc.preprocess(np.full((1, 64, 64, 3), 128, np.uint8))).shape == (1, 512)


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "convnext_atto"])
def test_embed_dim_is_what_forward_returns(name):
    # MobileNetV3 has a 1x1 conv after pooling: its output is wider than its trunk (num_features)
    with pytest.warns(RandomInitWarning):
        enc = create_encoder(name)
    with torch.inference_mode():
        out = enc(enc.preprocess(np.full((2, 64, 64, 3), 128, np.uint8)))
    assert out.shape == (2, enc.embed_dim)


def test_fixed_size_trunks_get_resized_inputs():
    with pytest.warns(RandomInitWarning):
        vit = create_encoder("vit_tiny_patch16_224")
    assert vit.fixed_input and vit.input_px == 224
    x = vit.preprocess(np.zeros((1, 112, 112, 3), np.uint8))
    assert x.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        assert vit(x).shape == (1, vit.embed_dim)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(EncoderError, match="not a timm architecture") as e:
        create_encoder("no_such_net")
    assert "efficientnet_lite0" in str(e.value)


def test_hf_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(EncoderError, match="offline") as e:
        create_encoder("hf-hub:MahmoodLab/UNI")
    assert time.perf_counter() - t0 < 2.0
    assert "huggingface-cli login" in str(e.value) and "efficientnet_lite0" in str(e.value)


# ------------------------------------------------------------------------------------------------ lite weights
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # EfficientNet(-Lite) stages, from the paper's table 1


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel at the bottom/right)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def reference_lite_logits(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite forward written directly on the package's original tensor names (independent of timm)."""
    def bn(t, p, act=True):
        t = F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                         False, 0.0, 1e-3)
        return F.relu6(t) if act else t

    def conv(t, w, s=1, groups=1):
        k = w.shape[-1]
        return F.conv2d(_same_pad(t, k, s), w, stride=s, groups=groups)

    t = bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0")
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    stage = -1
    for i in range(n_blocks):
        p = f"_blocks.{i}"
        c_in = sd[p + "._expand_conv.weight"].shape[1] if p + "._expand_conv.weight" in sd else sd[p + "._depthwise_conv.weight"].shape[0]
        c_out = sd[p + "._project_conv.weight"].shape[0]
        stride = 1
        if c_in != c_out:  # the first block of every stage changes the width
            stage += 1
            stride = STAGE_STRIDES[stage]
        h = t
        if p + "._expand_conv.weight" in sd:
            h = bn(conv(h, sd[p + "._expand_conv.weight"]), p + "._bn0")
        dw = sd[p + "._depthwise_conv.weight"]
        h = bn(conv(h, dw, stride, groups=dw.shape[0]), p + "._bn1")
        h = bn(conv(h, sd[p + "._project_conv.weight"]), p + "._bn2", act=False)
        t = h + t if (stride == 1 and c_in == c_out) else h
    t = bn(conv(t, sd["_conv_head.weight"]), "_bn1")
    return F.linear(t.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def _grace_hopper(px: int) -> np.ndarray:
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        w, h = im.size
        s = min(w, h)
        im = im.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return np.asarray(im.resize((px, px), Image.BICUBIC))[None]


@pytest.mark.parametrize("variant", sorted(LITE_WEIGHTS))
def test_lite_mapping_matches_reference_forward(variant):
    sd = load_lite_state_dict(variant)
    model, sha = lite_model(variant, num_classes=1000)
    assert len(sha) == 64
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(variant))
    with torch.inference_mode():
        got, ref = model(x), reference_lite_logits(sd, x)
    assert got.shape == (2, 1000)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), float((got - ref).abs().max())


def test_lite0_recognises_a_known_photo():
    """ImageNet class 652 ('military uniform') is the known answer for the Grace Hopper photo."""
    enc = create_encoder("efficientnet_lite0")
    assert enc.pretrained and enc.embed_dim == 1280 and enc.mean == enc.std == (0.5, 0.5, 0.5)
    assert enc.weights_id == file_sha256(lite_weights_path(0))[:16]
    model, _ = lite_model(0, num_classes=1000)
    x = enc.preprocess(_grace_hopper(224))
    with torch.inference_mode():
        logits = model(x)
        ref = reference_lite_logits(load_lite_state_dict(0), x)
        feats = enc(x)
        from_feats = model.classifier(feats)
    assert int(logits.argmax()) == 652 and int(ref.argmax()) == 652
    assert torch.allclose(logits, ref, atol=1e-4)
    # the encoder is the same network without its classifier: pooled features feed the same logits
    assert torch.allclose(from_feats, logits, atol=1e-4)


def test_mapping_refuses_weights_of_another_architecture():
    import timm

    wrong = timm.create_model("tf_efficientnet_lite2", pretrained=False, num_classes=1000)
    with pytest.raises(HistoMoEError, match="does not fit|do not belong"):
        map_lite_state_dict(load_lite_state_dict(0), wrong)


# ------------------------------------------------------------------------------------------------ text
def test_minilm_is_offline_384d_and_semantic():
    enc = create_text_encoder("minilm")
    v = enc.encode(["kidney, clear cell renal cell carcinoma", "renal clear cell carcinoma of the kidney",
                    "lung, adenocarcinoma"])
    assert v.shape == (3, 384) and v.dtype == np.float32 and enc.dim == 384
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.9 and v[0] @ v[2] < 0.5


def test_onehot_vocabulary():
    enc = create_text_encoder("onehot")
    v = enc.encode(["breast", "kidney", "breast"])
    assert enc.vocab == ["breast", "kidney"] and enc.dim == 2
    assert v.tolist() == [[1, 0], [0, 1], [1, 0]]
    assert enc.encode(["lung"]).tolist() == [[0, 0]]
    assert enc.index(["kidney", "lung"]).tolist() == [1, -1]


def test_metadata_text_from_sample_fields(her2st):
    s = her2st["B4"]
    assert metadata_text(s) == s.metadata_text()
    assert metadata_text(s, fields=("organ", "cancer_type")) == f"{s.meta['organ']}, {s.meta['cancer_type']}"
    assert metadata_text(s, fields=("organ", "no_such_field")) == str(s.meta["organ"])


def test_text_vectors_are_cached_and_the_encoder_is_not_loaded_again(tmp_path, monkeypatch):
    """A cached text encoder encodes each distinct text once, alone; later calls (other processes too) read the
    vectors from the embedding cache without building the encoder; a new cache id (weights version) misses."""
    from histomoe_core import embed
    from histomoe_core.encoders.text import TEXT_ENCODERS, TextEncoder

    monkeypatch.setenv("HISTOMOE_HOME", str(tmp_path))
    built, seen = [], []

    class Counting(TextEncoder):
        name, dim, version = "counting", 3, "1"

        def __init__(self):
            built.append(1)

        @classmethod
        def cache_id(cls):
            return f"counting-{cls.version}"

        def encode(self, texts):
            seen.append(list(texts))
            return np.array([[len(t), t.count("a"), 1.0] for t in texts], np.float32)

    monkeypatch.setitem(TEXT_ENCODERS._factories, "counting", Counting)
    monkeypatch.setattr(embed, "_TEXT_CACHE", {})
    texts = ["lung, FFPE", "brain", "lung, FFPE"]
    first = embed.encode_texts(texts, "counting")
    assert first.shape == (3, 3) and first[0, 0] == len("lung, FFPE") and np.array_equal(first[0], first[2])
    assert seen == [["lung, FFPE"], ["brain"]]  # each distinct text once, alone
    monkeypatch.setattr(embed, "_TEXT_CACHE", {})  # as a new process: nothing in memory
    assert np.array_equal(embed.encode_texts(["brain", "lung, FFPE"], "counting"), first[[1, 0]])
    assert len(built) == 1 and len(seen) == 2  # read from disk: the encoder was not built again
    Counting.version = "2"  # other weights: other vectors
    embed.encode_texts(["brain"], "counting")
    assert len(built) == 2 and seen[-1] == ["brain"]
