"""text_signal: the embed stage's measure of how much the texts tell molecules apart."""

import numpy as np
import pytest

from lardo_ray.stages.embed import text_signal


def test_identical_texts_have_no_signal_and_orthogonal_ones_full():
    same = [[1.0, 0.0, 0.0]] * 4
    s = text_signal(same, ["a", "a", "a", "a"])
    assert s == {"text_distinct": 0.25}  # one distinct text: nothing to compare
    eye = np.eye(4).tolist()
    s = text_signal(eye, ["a", "b", "c", "d"])
    assert s["text_distinct"] == 1.0 and s["text_mean_cosine"] == pytest.approx(0.0)
    assert s["text_effective_rank"] == pytest.approx(3.0, abs=1e-3)  # 4 centred one-hot points span 3 directions


def test_near_duplicates_read_near_one_and_nulls_are_skipped():
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    vecs = [(base + 0.01 * rng.normal(size=16)).tolist() for _ in range(50)] + [None]
    s = text_signal(vecs, [f"h{i}" for i in range(50)] + [None])
    assert s["text_mean_cosine"] > 0.99 and s["text_distinct"] == pytest.approx(50 / 51, abs=1e-4)
