"""Tiny offline T5/VAE builders, the frozen encoder wrappers, and the offline Hub errors."""

import shutil
import time

import pytest
import torch
from transformers import AutoTokenizer

from pixart_lightning import hub
from pixart_lightning.encoders.text import LazyTextEncoder, PromptFeatures, T5TextEncoder
from pixart_lightning.encoders.vae import VAE, LazyVAE
from pixart_lightning.hub import ModelNotAvailableError
from pixart_lightning.shapes.tiny_models import (
    build_tiny_models,
    build_tiny_t5,
    build_tiny_vae,
    shapes_corpus,
    word_level_t5_tokenizer,
)

CAPTION = "a large red circle in the upper left on a white background"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def encoder(tiny):
    return T5TextEncoder.from_pretrained(tiny["t5"])


@pytest.fixture(scope="module")
def vae(tiny):
    return VAE.from_pretrained(tiny["vae"])


def _images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


# Tokenizer


def test_tokenizer_keeps_corpus_words_whole(tiny):
    """A corpus caption tokenizes to one piece per word, then </s>."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["t5"])
    ids = tokenizer(CAPTION).input_ids
    assert CAPTION in shapes_corpus()
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁" + w for w in CAPTION.split()] + ["</s>"]
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 2


def test_tokenizer_spells_unseen_words(tiny):
    """An unseen word falls back to characters, not to <unk>."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["t5"])
    ids = tokenizer("a zebra").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁", "z", "e", "b", "r", "a", "</s>"]
    assert tokenizer.unk_token_id not in ids


def test_tokenizer_reloads_identically(tiny):
    """The saved folder reloads through AutoTokenizer with the same vocabulary and ids."""
    built = word_level_t5_tokenizer(shapes_corpus())
    loaded = AutoTokenizer.from_pretrained(tiny["t5"])
    assert len(loaded) == len(built) > 50
    for caption in [CAPTION, "a zebra, 3 feet tall.", ""]:
        assert loaded(caption).input_ids == built(caption).input_ids


# T5TextEncoder


def test_encode_shapes_and_mask(encoder):
    """Features are (B, 120, d_model); the mask counts the real tokens and is 0 on padding."""
    captions = [CAPTION, "a zebra", ""]
    features, mask = encoder.encode(captions)
    assert features.shape == (3, 120, encoder.dim) and encoder.dim == 32
    assert mask.shape == (3, 120) and mask.dtype == torch.long
    lengths = [len(encoder.tokenizer(c).input_ids) for c in captions]
    assert mask.sum(dim=1).tolist() == lengths == [len(CAPTION.split()) + 1, 8, 1]
    for row, n in zip(mask, lengths):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert torch.isfinite(features).all()


def test_encode_is_deterministic(encoder):
    """The same caption gives identical features, within a batch and across calls."""
    features, _ = encoder.encode([CAPTION, "a small blue square", CAPTION])
    again, _ = encoder.encode([CAPTION])
    assert torch.equal(features[0], features[2])
    assert torch.equal(features[0], again[0])
    assert not torch.equal(features[0], features[1])


def test_trim_cuts_to_longest_caption(encoder):
    """trim=True keeps only the longest caption's length, with the same leading features and mask."""
    captions = [CAPTION, "a small blue square", ""]
    full, full_mask = encoder.encode(captions)
    trimmed, mask = encoder.encode(captions, trim=True)
    length = len(CAPTION.split()) + 1
    assert trimmed.shape == (3, length, encoder.dim) and mask.shape == (3, length)
    assert torch.equal(mask, full_mask[:, :length])
    real = mask.bool()
    torch.testing.assert_close(trimmed[real], full[:, :length][real], atol=1e-5, rtol=1e-5)


def test_encoder_is_frozen(encoder):
    """No parameter trains, and a parent's .train() leaves T5 in eval mode."""
    parent = torch.nn.ModuleDict({"text": encoder}).train()
    assert not encoder.model.training and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    parent.eval()


def test_rebuild_from_same_seed_is_identical(tiny, tmp_path):
    """Rebuilding with the same seed reproduces the weights; another seed does not."""
    original = T5TextEncoder.from_pretrained(tiny["t5"]).model.state_dict()
    same = T5TextEncoder.from_pretrained(build_tiny_t5(tmp_path / "same", seed=0)).model.state_dict()
    other = T5TextEncoder.from_pretrained(build_tiny_t5(tmp_path / "other", seed=1)).model.state_dict()
    assert original.keys() == same.keys()
    assert all(torch.equal(original[k], same[k]) for k in original)
    assert not all(torch.equal(original[k], other[k]) for k in original)
    vae_a = VAE.from_pretrained(tiny["vae"]).model.state_dict()
    vae_b = VAE.from_pretrained(build_tiny_vae(tmp_path / "vae", seed=0)).model.state_dict()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)


def test_pipeline_folder_layout(tiny, tmp_path):
    """A diffusers pipeline folder (tokenizer/, text_encoder/, vae/) is found without naming subfolders."""
    for sub, src in [("tokenizer", "t5"), ("text_encoder", "t5"), ("vae", "vae")]:
        shutil.copytree(tiny[src], tmp_path / sub)
    features, _ = T5TextEncoder.from_pretrained(tmp_path, max_length=16).encode([CAPTION])
    assert features.shape == (1, 16, 32)
    assert VAE.from_pretrained(tmp_path).encode(_images()).shape == (2, 4, 4, 4)


# Lazy T5 and stored prompt features


def test_prompt_features_are_t5s_and_t5_loads_only_for_new_prompts(tiny, tmp_path):
    """Stored features equal T5's; they are encoded in chunks, T5 is freed after, and a second store over the same
    folder (another process, a resumed run) never loads T5. The folder is keyed by max_length."""
    captions = [CAPTION, "a small blue square", "a zebra", "", "a large green triangle at the top"]
    lazy = LazyTextEncoder(tiny["t5"], max_length=16)
    assert lazy.dim == 32 and not lazy.loaded  # the width comes from the config
    batches = []
    lazy.load().model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(len(kwargs["input_ids"])), with_kwargs=True)
    store = PromptFeatures(tmp_path, lazy, chunk=2)
    assert store.fill([*captions, CAPTION]) == 5 and batches == [2, 2, 1] and not lazy.loaded
    again = LazyTextEncoder(tiny["t5"], max_length=16)
    reader = PromptFeatures(tmp_path, again)
    features, mask = reader.encode([captions[2], captions[0], captions[3]], trim=True)
    assert not again.loaded and reader.fill(captions) == 0
    expected, expected_mask = T5TextEncoder.from_pretrained(tiny["t5"], max_length=16).encode(
        [captions[2], captions[0], captions[3]], trim=True)
    assert torch.equal(mask, expected_mask) and features.shape == expected.shape
    torch.testing.assert_close(features[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    assert (features[~mask.bool()] == 0).all()
    assert reader.encode([CAPTION])[0].shape == (1, 16, 32)  # untrimmed: padded to max_length
    assert PromptFeatures(tmp_path, LazyTextEncoder(tiny["t5"], max_length=8)).missing(captions) == captions


def test_lazy_vae_loads_at_its_first_decode(tiny):
    """Geometry and posterior scaling without weights; decoding loads them and matches the VAE."""
    lazy = LazyVAE(tiny["vae"])
    mean, std = torch.randn(2, 4, 4, 4), torch.rand(2, 4, 4, 4)
    noise = torch.randn(2, 4, 4, 4)
    assert (lazy.downsample_factor, lazy.latent_channels) == (8, 4)
    torch.testing.assert_close(lazy.latents_from_posterior(mean, std, noise), (mean + std * noise) * 0.18215)
    assert not lazy.loaded
    latents = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(lazy.decode(latents), VAE.from_pretrained(tiny["vae"]).decode(latents))
    assert lazy.loaded


# VAE


def test_vae_shapes(vae):
    """Images (2, 3, 32, 32) encode to (2, 4, 4, 4) latents and decode back to images in [-1, 1]."""
    assert vae.downsample_factor == 8 and vae.latent_channels == 4
    latents = vae.encode(_images())
    assert latents.shape == (2, 4, 4, 4)
    images = vae.decode(latents)
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1


def test_vae_applies_scale_factor(vae):
    """encode() is the posterior mean times 0.18215, and decode() divides it back out."""
    x = _images()
    mean, std = vae.encode_posterior(x)
    assert vae.scale_factor == 0.18215
    torch.testing.assert_close(vae.encode(x), mean * 0.18215)
    assert (std > 0).all()
    raw = vae.model.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(mean * 0.18215), raw, atol=1e-5, rtol=1e-5)


def test_vae_sampling_is_seeded(vae):
    """sample=True with a fixed generator repeats exactly and differs from the mean."""
    x = _images()
    first = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    second = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert not torch.allclose(first, vae.encode(x))


# Offline Hub


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """Point the Hugging Face cache at an empty folder, so a model cached on this machine cannot mask a failure."""
    monkeypatch.setattr(hub.huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_offline_hub_id_fails_fast_with_instructions(monkeypatch, empty_hub_cache):
    """With HF_HUB_OFFLINE=1 a Hub id fails at once, naming the model and how to supply a local folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("offline mode must not probe the Hub"))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError, match="DeepFloyd/t5-v1_1-xxl") as err:
        T5TextEncoder.from_pretrained("DeepFloyd/t5-v1_1-xxl")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "offline" in message and "--local-dir" in message and "folder" in message


def test_unreachable_hub_fails_fast(monkeypatch, empty_hub_cache):
    """Without offline mode, an unreachable Hub also gives the error instead of minutes of retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub.huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError, match="stabilityai/sd-vae-ft-ema"):
        VAE.from_pretrained("stabilityai/sd-vae-ft-ema")
    assert time.monotonic() - start < 5


def test_missing_local_folder(tmp_path):
    """A path that does not exist is reported as a missing folder, not as a Hub problem."""
    with pytest.raises(FileNotFoundError, match="no such folder"):
        T5TextEncoder.from_pretrained(tmp_path / "missing" / "t5")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        VAE.from_pretrained(str(tmp_path / "missing"))
