"""Fréchet distance and the digits classifier."""

import numpy as np
import pytest

from fastdiff.testing import frechet_distance


def test_frechet_distance_of_gaussians_has_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + np.array([1.0, 0.0, -1.0])
    # ||Δμ||² + Σ (σ_a − σ_b)² for diagonal covariances: 2 + 3·(1 − 2)² = 5
    assert frechet_distance(a, b) == pytest.approx(5.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_refuses_mismatched_features():
    with pytest.raises(ValueError, match="equal d"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_shipped_classifier_reads_the_real_digits():
    pytest.importorskip("sklearn")
    from fastdiff.models.digits import load_data
    from fastdiff.models.loading import ModelNotFoundError
    from fastdiff.testing import digits_accuracy, digits_fd
    from fastdiff.testing.digits import classifier

    try:
        model = classifier()
    except ModelNotFoundError as exc:
        pytest.fail(f"the committed digits classifier did not load: {exc}")
    images, labels = load_data()
    assert digits_accuracy(images, labels.tolist(), model) >= 0.995  # measured 0.9978 (4 of 1797 wrong)
    assert digits_fd(images, model) == pytest.approx(0.0, abs=1e-6)
