"""FID: the arithmetic against closed forms, the cached reference, offline Inception, sharding and the callback."""

from __future__ import annotations

import json
import urllib.request
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from scipy import linalg

from callbacks.fid import FIDCallback
from pixart_lightning.config import FIDSection
from pixart_lightning.encoders.frozen import FrozenEncoders
from pixart_lightning.encoders.vae import PixelSpace
from pixart_lightning.evaluation import extractors, fid
from pixart_lightning.evaluation.captions import Caption, load_captions, pin_captions, pinned_captions
from pixart_lightning.evaluation.data_source import real_images
from pixart_lightning.evaluation.errors import FIDError
from pixart_lightning.evaluation.extractors import INCEPTION_FILE, FeatureExtractor, TinyFeatures, load_extractor
from pixart_lightning.evaluation.feature_stats import Moments, frechet_distance, reference_stats
from pixart_lightning.shapes.synth import synthesize


def closed_form(mu1, s1, mu2, s2) -> float:
    """The Fréchet distance of two Gaussians through the symmetric form Tr((S1^½ S2 S1^½)^½) (not clean-fid's)."""
    root = linalg.sqrtm(s1).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(root @ s2 @ root).real))


def spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_closed_forms():
    """clean-fid's distance equals scipy's symmetric closed form, and the exact value for commuting covariances."""
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = rng.normal(size=6), rng.normal(size=6), spd(6, rng), spd(6, rng)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-8)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    exact = 1.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # |mu1 - mu2|² = 1
    assert frechet_distance(np.zeros(3), np.diag(a), np.eye(3)[0], np.diag(b)) == pytest.approx(exact, rel=1e-10)


def test_moments_of_samples_recover_the_gaussians_fid():
    """Mean and covariance from summed moments (split across 'ranks') give the two Gaussians' FID."""
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=4), rng.normal(size=4), spd(4, rng), spd(4, rng)
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    halves = [Moments(4), Moments(4)]
    halves[0].add(x[:15000])
    halves[1].add(x[15000:])
    mx = halves[0].merge(halves[1])
    my = Moments(4)
    my.add(y)
    mean, cov = mx.mean_cov()
    assert np.allclose(mean, x.mean(0)) and np.allclose(cov, np.cov(x, rowvar=False))
    assert frechet_distance(*mx.mean_cov(), *my.mean_cov()) == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=0.05)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shapes-world shards at 16 px with captions and class labels: the reference images."""
    folder = tmp_path_factory.mktemp("world")
    synthesize(folder, count=48, seed=0, resolution=16, samples_per_shard=24, progress=False)
    return folder


def tiny_settings(world, tmp_path, **changes) -> FIDSection:
    fields = dict(reference=str(world), extractor="tiny", resize=32, num_images=6, batch_size=4, steps=2,
                  cache_dir=str(tmp_path / "cache"))
    return FIDSection(**{**fields, **changes})


def test_identical_sets_give_zero_and_different_sets_do_not(world, tmp_path):
    """Generated-image features of the reference images themselves reproduce its statistics; noise is far."""
    settings = tiny_settings(world, tmp_path)
    extractor = load_extractor(settings)
    ref = reference_stats(str(world), extractor, settings.cache_dir)
    assert ref.count == 48
    same = Moments(extractor.dim)
    same.add(extractor(torch.stack(list(real_images(str(world), 0)))))
    assert abs(frechet_distance(*same.mean_cov(), ref.mu, ref.sigma)) < 1e-4  # 48 images, 83 features: singular
    noise = Moments(extractor.dim)
    noise.add(extractor(torch.randint(0, 256, (48, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)))
    assert frechet_distance(*noise.mean_cov(), ref.mu, ref.sigma) > 100


class Counting(torch.nn.Module):
    """Wraps the tiny extractor and counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.inner, self.seen = TinyFeatures(), 0

    def forward(self, x):
        self.seen += len(x)
        return self.inner(x)


def test_reference_statistics_are_cached_and_keyed(tmp_path):
    """A second call reads the .npz; another count, resize or changed folder computes (and caches) anew."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # odd sizes: centre-cropped to squares
        Image.fromarray(rng.integers(0, 256, (12 + i, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    counting = Counting()
    extractor = FeatureExtractor(counting, "tiny", "counting", TinyFeatures.dim, 32, torch.device("cpu"))
    first = reference_stats(str(folder), extractor, tmp_path / "cache")
    again = reference_stats(str(folder), extractor, tmp_path / "cache")
    assert counting.seen == 6 and again.cache == first.cache and np.array_equal(again.sigma, first.sigma)
    assert reference_stats(str(folder), extractor, tmp_path / "cache", count=4).count == 4
    assert counting.seen == 10
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "new.png")
    grown = reference_stats(str(folder), extractor, tmp_path / "cache")
    assert grown.count == 7 and grown.cache != first.cache and counting.seen == 17
    extractor.resize = 40
    assert reference_stats(str(folder), extractor, tmp_path / "cache").cache not in (first.cache, grown.cache)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4 and not list((tmp_path / "cache").glob(".*tmp"))


def test_missing_inception_weights_say_how_to_get_them(tmp_path, monkeypatch):
    """No download is attempted; the message names the URL and where to put the file."""
    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(extractors, "DEFAULT_INCEPTION", tmp_path / "home" / INCEPTION_FILE)
    monkeypatch.setattr(extractors.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.raises(FIDError, match="curl -L -o inception-2015-12-05.pt https://nvlabs-fi-cdn") as err:
        load_extractor(FIDSection())
    assert str(tmp_path / "home") in str(err.value) and "fid.inception_weights" in str(err.value)
    with pytest.raises(FIDError, match="missing.pt"):
        load_extractor(FIDSection(inception_weights=str(tmp_path / "missing.pt")))


class FakeInception(torch.nn.Module):
    """TorchScript stand-in with the interface clean-fid uses (``layers`` -> 2048 x 1 x 1)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))

    def forward(self, x):
        return self.layers(x)


def test_inception_loads_from_a_local_file(tmp_path):
    """clean-fid's InceptionV3W runs from the configured file (or folder) at 299 px; a renamed file is refused."""
    torch.jit.script(FakeInception()).save(str(tmp_path / INCEPTION_FILE))
    for setting in (tmp_path, tmp_path / INCEPTION_FILE):
        extractor = load_extractor(FIDSection(inception_weights=str(setting)))
        features = extractor(torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8))
        assert features.shape == (2, 2048) and extractor.identity.startswith("inception-2015-12-05:")
    (tmp_path / INCEPTION_FILE).rename(tmp_path / "weights.pt")
    with pytest.raises(FIDError, match="rename it"):
        load_extractor(FIDSection(inception_weights=str(tmp_path / "weights.pt")))


def test_settings_and_captions(tmp_path):
    """Bad choices are named; caption files in three formats; the pinned subset is seeded and in source order."""
    problems = FIDSection(extractor="clip", sampler="ddim", resize=256, num_images=1).problems()
    assert len(problems) == 3 and any("fid.extractor='clip'" in p for p in problems)
    with pytest.raises(FIDError, match="resize=256"):
        fid.check_settings(FIDSection(resize=256))
    (tmp_path / "c.txt").write_text("a red circle\n\na blue square\n")
    assert load_captions(str(tmp_path / "c.txt")) == [Caption(0, "a red circle"), Caption(2, "a blue square")]
    coco = {"annotations": [{"id": 7, "image_id": 1, "caption": " A cat. "}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert load_captions(str(tmp_path / "coco.json")) == [Caption(7, "A cat.")]
    captions = [Caption(i, f"caption {i}") for i in range(100)]
    (tmp_path / "list.json").write_text(json.dumps([{"id": c.id, "caption": c.caption} for c in captions]))
    assert load_captions(str(tmp_path / "list.json")) == captions
    pinned = pin_captions(captions, 10, seed=3)
    assert pinned == pin_captions(captions, 10, seed=3) != pin_captions(captions, 10, seed=4)
    assert [c.id for c in pinned] == sorted(c.id for c in pinned) and len(set(pinned)) == 10
    with pytest.raises(FIDError, match="needs 101 captions"):
        pin_captions(captions, 101, seed=0)


class StubEncoder:
    """Deterministic caption features from the words, in place of T5."""

    def encode(self, prompts, trim=True):
        rows = [torch.randn(3, 16, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        return torch.stack(rows), torch.ones(len(prompts), 3, dtype=torch.long)


def test_images_do_not_depend_on_the_number_of_ranks(world, tmp_path):
    """Every caption is generated once over the ranks, and two ranks' moments add up to one rank's."""
    for world_size in (1, 2, 3):
        chunks = [c for rank in range(world_size) for c in fid.rank_chunks(7, 3, rank, world_size)]
        assert sorted(i for c in chunks for i in c) == list(range(7))
    settings = tiny_settings(world, tmp_path, num_images=7, batch_size=3)
    captions = pinned_captions(settings)
    extractor = load_extractor(settings)
    model = tiny_model(in_channels=3)

    def moments(rank, world_size):
        return fid.generated_moments(model, PixelSpace(), StubEncoder(), settings, captions, extractor, height=16, width=16,
                                     rank=rank, world_size=world_size)

    one = moments(0, 1)
    two = moments(0, 2).merge(moments(1, 2))
    assert one.count == two.count == 7
    assert np.allclose(one.mean_cov()[0], two.mean_cov()[0], atol=1e-9)
    assert np.allclose(one.mean_cov()[1], two.mean_cov()[1], atol=1e-9)
    assert not np.allclose(one.mean_cov()[0], moments(0, 2).mean_cov()[0])  # a rank alone has other images


class TinyStage(L.LightningModule):
    """What the callback uses of a stage module, around a class-mode tiny PixArt in pixel space."""

    def __init__(self):
        super().__init__()
        self.model = tiny_model(mode="class", num_classes=27, in_channels=3)
        self.encoders = FrozenEncoders(PixelSpace())
        self.cfg = SimpleNamespace(data=SimpleNamespace(resolution=16), diffusion=SimpleNamespace(prediction="epsilon"))

    def sampling_model(self, use_ema: bool = True):
        return self.model

    def training_step(self, batch, batch_idx):
        return sum(p.sum() for p in self.model.parameters()) * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)


def test_callback_logs_and_writes_records(world, tmp_path):
    """At the start, every step and the end: eval/fid in TensorBoard and records in fid.json (steps 0, 1, 2)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = tiny_settings(world, tmp_path, every_n_steps=1, at_start=True)
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="", version="tb")
    trainer = L.Trainer(max_steps=2, logger=logger, callbacks=[FIDCallback(settings, tmp_path / "out")],
                        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(TinyStage())
    records = json.loads((tmp_path / "out" / "fid.json").read_text())
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and r["num_images"] == 6 for r in records)
    assert records[0]["extractor"]["name"] == "tiny" and records[0]["reference"]["count"] == 48
    assert records[0]["captions"]["ids_sha256"] == records[2]["captions"]["ids_sha256"]
    pinned = json.loads((tmp_path / "out" / "fid-captions.json").read_text())
    assert len(pinned) == 6 and all("label" in c for c in pinned)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("eval/fid")  # float32 in the event file
    assert [e.step for e in scalars] == [0, 1, 2]
    assert [e.value for e in scalars] == pytest.approx([r["fid"] for r in records], rel=1e-6)


def test_a_record_replaces_those_of_an_attempt_that_did_not_reach_a_checkpoint(tmp_path):
    """A stage killed after its step-0 FID and trained again from step 0 keeps one step-0 record, not two."""
    path = tmp_path / "fid.json"
    for step, value in [(0, 552.0), (200, 300.0), (0, 551.0), (400, 129.0)]:
        fid.append_record(path, {"step": step, "fid": value})
    assert [(r["step"], r["fid"]) for r in json.loads(path.read_text())] == [(0, 551.0), (400, 129.0)]
