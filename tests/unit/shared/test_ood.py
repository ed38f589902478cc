"""The out-of-distribution reference: stored and read back exactly, and judged by distance and colour."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from shared.core.errors import XrayqError
from shared.core.storage import LocalObjectStore
from shared.models.ood import CODE, METHOD, OodReference, checks_of, load_reference


def reference(width: int = 8) -> OodReference:
    generator = torch.Generator().manual_seed(0)
    return OodReference(
        mean=torch.randn(width, generator=generator),
        scale=torch.rand(width, generator=generator) + 0.5,
        precision=torch.eye(width),
        threshold=2.0,
        colour_limit=0.03,
        template=np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16),
    )


def test_distance_is_zero_at_the_mean_and_grows_with_standardised_offsets() -> None:
    ref = reference()
    assert ref.distances(ref.mean.unsqueeze(0)).item() == pytest.approx(0.0, abs=1e-6)
    three_sd = (ref.mean + 3 * ref.scale).unsqueeze(0)
    assert ref.distances(three_sd).item() == pytest.approx(3.0, rel=1e-5)  # identity precision: RMS z-score


def test_judge_flags_distance_or_colour_with_a_sentence() -> None:
    ref = reference()
    assert ref.judge(1.9, 0.0) is None
    far = ref.judge(2.5, 0.0)
    assert far is not None and far.code == CODE and "feature distance 2.50" in far.detail
    coloured = ref.judge(0.5, 0.2)
    assert coloured is not None and coloured.code == CODE and "colour" in coloured.detail
    assert ref.judge(0.5, None) is None  # not measured: judged on the features alone


def test_stored_reference_reads_back_and_a_changed_one_is_refused(tmp_path) -> None:
    ref, store = reference(), LocalObjectStore(tmp_path)
    content = ref.to_bytes()
    store.put("models/m/1/ood.safetensors", content)
    section = {
        "method": METHOD, "key": "models/m/1/ood.safetensors", "sha256": hashlib.sha256(content).hexdigest(),
        "threshold": ref.threshold, "colour_limit": ref.colour_limit,
    }  # fmt: skip
    loaded = load_reference({"ood": section}, store)
    assert loaded is not None
    assert torch.equal(loaded.mean, ref.mean) and np.array_equal(loaded.template, ref.template)
    store.put("models/m/1/ood.safetensors", content[:-1] + b" ")
    with pytest.raises(XrayqError) as refused:
        load_reference({"ood": section}, store)
    assert refused.value.code == "model_corrupt"


def test_a_card_without_a_reference_serves_without_the_check_and_says_why(tmp_path) -> None:
    assert load_reference({"name": "m"}, LocalObjectStore(tmp_path)) is None
    checks = checks_of({"name": "m"})
    assert checks["out_of_distribution"].startswith("off:") and checks["input_quality"].startswith("on:")
