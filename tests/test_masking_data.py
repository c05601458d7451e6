"""Pretraining masks (spec 10.2), manifest datasets and the pretraining collate."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import ASSETS, BPE_DIR, FIXTURES, require

from onepeace.config import RELEASED_AUDIO_FEATURE_SPEC
from onepeace.data.audio import AudioTransform, feature_lengths
from onepeace.data.datasets import ManifestDataset, collate_pretrain, read_manifest
from onepeace.data.image import ImageTransform
from onepeace.data.masking import (
    MaskingConfig,
    item_generator,
    joint_image_mask,
    joint_text_mask,
    pad_masks,
    pad_preserve_ids,
    preserve_ids,
    random_mask,
    span_mask,
    whole_word_mask,
)
from onepeace.tokenizer import Tokenizer

CAPTION = "an unbelievably photogenic hippopotamus swimming past the riverbank"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(require(BPE_DIR))


@pytest.fixture(scope="module")
def pretrain_batches() -> dict:
    data = torch.load(require(FIXTURES / "official-pretrain-tiny" / "expected.pt"), weights_only=False)
    return {"vl": data["vl_sample"]["net_input"], "al": data["al_sample"]["net_input"]}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _words(word_starts: torch.Tensor) -> list[list[int]]:
    """Token indices of each word (EOS excluded)."""
    words: list[list[int]] = []
    for j, start in enumerate(word_starts[:-1].tolist()):
        if start or not words:
            words.append([])
        words[-1].append(j)
    return words


# ---------------------------------------------------------------------------------- masking rules


@pytest.mark.parametrize("ratio", [0.15, 0.4, 1.0])
def test_whole_word_mask_masks_whole_words(tokenizer, ratio):
    tokens = torch.tensor(tokenizer.encode(CAPTION))  # (T,)
    starts = tokenizer.word_start_mask(tokens)
    words = _words(starts)
    assert any(len(w) > 1 for w in words), "caption must contain multi-token words"
    for seed in range(20):
        mask = whole_word_mask(starts, ratio, _gen(seed))
        assert mask.shape == (tokens.numel() + 1,) and mask.dtype == torch.bool
        assert not mask[0] and not mask[-1]  # CLS and </s>
        token_mask = mask[1:-1]
        n_masked_words = 0
        for w in words:
            states = {bool(token_mask[j]) for j in w}
            assert len(states) == 1, f"word {w} partly masked"  # whole word or nothing
            n_masked_words += states.pop()
        assert n_masked_words == math.ceil(ratio * len(words))


def test_whole_word_mask_edge_cases(tokenizer):
    only_eos = tokenizer.word_start_mask(torch.tensor([tokenizer.eos_id]))
    assert whole_word_mask(only_eos, 0.4, _gen()).tolist() == [False, False]
    # a leading continuation token still belongs to a word (the first one)
    cont_first = torch.tensor([False, False, True, True])  # 3 tokens + </s>
    assert whole_word_mask(cont_first, 1.0, _gen()).tolist() == [False, True, True, True, False]
    for seed in range(5):  # 2 words: tokens {0, 1} and {2}; ceil(0.5 * 2) = 1 of them
        half = whole_word_mask(cont_first, 0.5, _gen(seed))[1:4].tolist()
        assert half in ([True, True, False], [False, False, True])
    one_word = tokenizer.word_start_mask(torch.tensor(tokenizer.encode("dog")))
    # a tiny ratio still masks one word (ceil), never the </s>
    assert whole_word_mask(one_word, 0.01, _gen()).tolist() == [False, True, False]
    assert not whole_word_mask(one_word, 0.0, _gen()).any()


def test_random_mask_exact_count():
    for count in (0, 5, 12, 16):
        mask = random_mask(16, count, _gen(count))
        assert mask.shape == (17,) and not mask[0] and int(mask.sum()) == count
    with pytest.raises(ValueError):
        random_mask(4, 5, _gen())


def test_joint_text_mask_prefers_kept_tokens(tokenizer):
    tokens = torch.tensor(tokenizer.encode(CAPTION))
    n = tokens.numel() - 1
    starts = tokenizer.word_start_mask(tokens)
    for seed in range(20):
        g = _gen(seed)
        text = whole_word_mask(starts, 0.15, g)
        joint = joint_text_mask(text, n, 0.4, g)
        assert joint.shape == text.shape and not joint[0] and not joint[-1]
        count = int(0.4 * n)
        assert int(joint.sum()) == count
        n_kept = n - int(text.sum())
        if count <= n_kept:
            assert not (joint & text).any()  # complementary: only text-only-kept tokens
        else:
            assert joint[1 : n + 1][~text[1 : n + 1]].all()
    # more than the kept tokens: all kept ones first, the rest from the masked ones
    text = torch.tensor([False, True, True, True, False, False])  # 4 tokens + </s>, 1 kept
    joint = joint_text_mask(text, 4, 0.75, _gen())
    assert int(joint.sum()) == 3 and joint[4] and not joint[5] and not joint[0]


def test_joint_image_mask_complements_image_only():
    for n in (16, 196):
        for seed in range(10):
            g = _gen(seed)
            image = random_mask(n, int(0.75 * n), g)
            joint = joint_image_mask(image, 0.6875, g)
            assert joint.shape == (n + 1,) and not joint[0]
            assert int(joint.sum()) == int(0.6875 * n)
            assert joint[1:][~image[1:]].all()  # every patch the image-only view kept
    # kept patches exceed the count: just that many of them
    image = random_mask(16, 4, _gen())  # 12 kept
    joint = joint_image_mask(image, 0.5, _gen(1))
    assert int(joint.sum()) == 8 and not (joint & image).any()


@pytest.mark.parametrize("n_frames", [1, 7, 50, 74, 500])
@pytest.mark.parametrize("ratio", [0.45, 0.55])
def test_span_mask_exact_count(n_frames, ratio):
    for seed in range(5):
        mask = span_mask(n_frames, ratio, 5, _gen(seed))
        assert mask.shape == (n_frames + 1,) and not mask[0]
        assert int(mask.sum()) == int(n_frames * ratio)


def test_span_mask_masks_spans():
    mask = span_mask(500, 0.55, 5, _gen())
    runs = int((mask[1:] & ~torch.cat([torch.tensor([False]), mask[1:-1]])).sum())
    assert int(mask.sum()) == 275 and runs < 275 / 2  # contiguous spans, not scattered frames


def test_masks_are_deterministic_per_generator(tokenizer):
    starts = tokenizer.word_start_mask(torch.tensor(tokenizer.encode(CAPTION)))

    def draw(g):
        return [whole_word_mask(starts, 0.4, g), random_mask(196, 147, g), span_mask(300, 0.55, 5, g)]

    a, b = draw(item_generator(0, 1, 7)), draw(item_generator(0, 1, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (item_generator(0, 2, 7), item_generator(0, 1, 8), item_generator(1, 1, 7)):
        c = draw(other)
        assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_masking_config_validates():
    assert MaskingConfig().vl_image_mask_ratio == 0.6875
    with pytest.raises(ValueError):
        MaskingConfig(text_mask_ratio=1.5)


# ---------------------------------------------------------------------------------- fixture format


def _check_view(net: dict, view: str, valid: torch.Tensor) -> None:
    """Rebuild a view's padded masks and preserve ids from unpadded per-item masks."""
    mask = net[f"{view}_mask_indices"]
    expected_ids = net[f"{view}_preserve_ids"]
    ids = pad_preserve_ids([preserve_ids(m, v) for m, v in zip(mask, valid)])
    assert ids.dtype == expected_ids.dtype == torch.int64
    assert torch.equal(ids, expected_ids), view
    lengths = valid.sum(1).tolist()
    # valid positions are a prefix: per-item unpadded masks, re-padded with False
    assert all(bool(v[:n].all()) and not bool(v[n:].any()) for v, n in zip(valid, lengths))
    unpadded = [m[:n] for m, n in zip(mask, lengths)]
    assert torch.equal(pad_masks(unpadded, mask.shape[1]), mask), view
    assert not mask[:, 0].any()
    # kept-by-id equals not-masked-and-valid
    for m, v, row in zip(mask, valid, ids):
        assert torch.equal(row[row >= 0], preserve_ids(m, v))


def test_preserve_ids_format_matches_fixture(pretrain_batches):
    for kind in ("vl", "al"):
        net = pretrain_batches[kind]
        tokens = net["src_tokens"]
        text_valid = torch.cat([torch.ones(tokens.shape[0], 1, dtype=torch.bool), tokens != 1], 1)
        eos = text_valid.sum(1) - 1  # position of </s>
        for view in ("text", f"{kind}_text"):
            _check_view(net, view, text_valid)
            assert not net[f"{view}_mask_indices"].gather(1, eos[:, None]).any()
        if kind == "vl":
            image_valid = torch.ones_like(net["image_mask_indices"])
            for view in ("image", "vl_image"):
                _check_view(net, view, image_valid)
        else:
            audio_valid = ~net["audio_padding_masks"]
            for view in ("audio", "al_audio"):
                _check_view(net, view, audio_valid)


# ---------------------------------------------------------------------------------- datasets


def _link(tmp_path, name: str, target) -> str:
    link = tmp_path / name
    link.symlink_to(require(target))
    return name


@pytest.fixture()
def manifests(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4)
    vl = [
        {"image": _link(tmp_path, "dog.jpg", ASSETS / "dog.JPEG"), "text": CAPTION},  # relative
        {"image": str(tmp_path / "missing.jpg"), "text": "nothing here"},
        {"image": str(require(ASSETS / "elephant.JPEG")), "text": "an elephant", "label": 3},
        {"image": "corrupt.jpg", "text": "a broken file"},
    ]
    al = [
        {"audio": str(require(ASSETS / "cow.flac")), "text": "a cow moos loudly"},
        {"audio": "nowhere/missing.flac", "text": "silence"},
        {"audio": _link(tmp_path, "dog.flac", ASSETS / "dog.flac"), "text": "a dog barks"},
    ]
    paths = {}
    for kind, rows in (("vl", vl), ("al", al)):
        paths[kind] = tmp_path / f"{kind}.jsonl"
        paths[kind].write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return paths


def _dataset(path, tokenizer, **kw) -> ManifestDataset:
    return ManifestDataset(path, tokenizer=tokenizer, image_transform=ImageTransform(size=64),
                           audio_transform=AudioTransform(max_seconds=1.5),
                           audio_feature_spec=RELEASED_AUDIO_FEATURE_SPEC, **kw)


def test_read_manifest(manifests, tmp_path):
    entries = read_manifest(manifests["vl"])
    assert len(entries) == 4
    assert entries[0]["image"] == str(tmp_path / "dog.jpg") and entries[2]["label"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "text": "ok"}\n{"image": "b.jpg", "text": \n')
    with pytest.raises(ValueError, match=f"{bad}:2"):
        read_manifest(bad)
    bad.write_text('{"image": "a.jpg", "audio": "b.flac", "text": "both"}\n')
    with pytest.raises(ValueError, match=f"{bad}:1"):
        read_manifest(bad)


@pytest.mark.parametrize("kind", ["vl", "al"])
def test_dataset_batches_match_fixture_layout(kind, manifests, tokenizer, pretrain_batches, caplog):
    ds = _dataset(manifests[kind], tokenizer)
    with caplog.at_level(logging.WARNING, logger="onepeace.data"):
        items = [ds[i] for i in range(len(ds))]
    bad = [i for i, it in enumerate(items) if it is None]
    assert bad == ([1, 3] if kind == "vl" else [1])
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "onepeace.data")
    for i in bad:
        assert ds.entries[i][kind == "vl" and "image" or "audio"] in logged
    assert "file not found" in logged
    if kind == "vl":
        assert "corrupt" in logged

    good = [it for it in items if it is not None]
    for it in good:  # per-item masks obey the never-masked positions
        assert it["kind"] == kind and it["tokens"][-1] == 2
        for key in it:
            if key.endswith("_mask_indices"):
                assert not it[key][0]
                if "text" in key:
                    assert it[key].numel() == it["tokens"].numel() + 1 and not it[key][-1]
    if kind == "al":
        for it in good:
            assert it["audio_frames"] == feature_lengths(it["audio"].numel(), RELEASED_AUDIO_FEATURE_SPEC)
            assert int(it["audio_mask_indices"].sum()) == int(it["audio_frames"] * 0.55)
            assert int(it["al_audio_mask_indices"].sum()) == int(it["audio_frames"] * 0.45)

    batch = collate_pretrain(items)
    expected = pretrain_batches[kind]
    assert set(batch) == set(expected) | {"index", "kind"}
    assert batch["kind"] == kind and batch["index"].tolist() == [i for i, it in enumerate(items) if it]
    B = len(good)
    T = batch["src_tokens"].shape[1]
    for key, ref in expected.items():
        got = batch[key]
        assert got.dtype == ref.dtype and got.dim() == ref.dim() and got.shape[0] == B, key
        if key.endswith("_mask_indices"):
            modality = "text" if "text" in key else kind == "vl" and "image" or "audio"
            width = {"text": T + 1, "image": ref.shape[1],
                     "audio": batch.get("audio_padding_masks", ref).shape[1]}[modality]
            assert got.shape[1] == width, key
            view = key[: -len("_mask_indices")]
            ids = batch[f"{view}_preserve_ids"]
            assert ids.shape[1] == max(int(it[f"{view}_preserve_ids"].numel()) for it in good)
    if kind == "vl":
        assert batch["src_images"].shape[1:] == expected["src_images"].shape[1:]
        assert (batch["src_tokens"][1] == 1).sum() > 0  # the shorter caption is padded with 1
        text_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), batch["src_tokens"] != 1], 1)
        for b in range(B):
            assert torch.equal(batch["vl_text_preserve_ids"][b][batch["vl_text_preserve_ids"][b] >= 0],
                               preserve_ids(batch["vl_text_mask_indices"][b], text_valid[b]))
            assert not batch["text_mask_indices"][b][~text_valid[b]].any()
    else:
        pad = batch["audio_padding_masks"]
        assert pad.shape[1] == feature_lengths(batch["src_audios"].shape[1], RELEASED_AUDIO_FEATURE_SPEC) + 1
        assert not (batch["audio_mask_indices"] & pad).any()
        for b in range(B):
            ids = batch["al_audio_preserve_ids"][b]
            assert torch.equal(ids[ids >= 0], preserve_ids(batch["al_audio_mask_indices"][b], ~pad[b]))


def test_dataset_masks_depend_on_seed_epoch_index(manifests, tokenizer):
    ds = _dataset(manifests["vl"], tokenizer, seed=3)
    ds.set_epoch(0)
    later = ds[2]  # reading order must not matter
    first = ds[0]
    again = _dataset(manifests["vl"], tokenizer, seed=3)
    assert all(torch.equal(first[k], again[0][k]) for k in first if k.endswith("_mask_indices"))
    assert all(torch.equal(later[k], again[2][k]) for k in later if k.endswith("_mask_indices"))
    ds.set_epoch(1)
    other_epoch = ds[0]
    keys = [k for k in first if k.endswith("_mask_indices")]
    assert len(keys) == 4
    assert not all(torch.equal(first[k], other_epoch[k]) for k in keys)
    assert torch.equal(first["image"], other_epoch["image"])


def test_collate_rejects_mixed_kinds_and_all_bad(manifests, tokenizer):
    vl = _dataset(manifests["vl"], tokenizer)
    al = _dataset(manifests["al"], tokenizer)
    assert collate_pretrain([None, vl[1]]) is None
    with pytest.raises(ValueError, match="different kinds"):
        collate_pretrain([vl[2], al[0]])


def test_no_masking_mode(manifests, tokenizer):
    for kind, media in (("vl", "src_images"), ("al", "src_audios")):
        ds = _dataset(manifests[kind], tokenizer, masking=None)
        item = ds[0]
        assert not any("mask_indices" in k or "preserve_ids" in k for k in item)
        batch = collate_pretrain([ds[i] for i in range(len(ds))])
        assert not any("mask_indices" in k or "preserve_ids" in k for k in batch)
        assert media in batch and batch["src_tokens"].dtype == torch.int64
        assert ("audio_padding_masks" in batch) == (kind == "al")
