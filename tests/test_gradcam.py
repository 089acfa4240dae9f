"""Grad-CAM / Grad-CAM++ (fer.explain.gradcam, fer.runtime.gradients): real models, real gradients.

The expensive test (`test_gradcam_heat_falls_on_the_face_features`) trains one small
ImageNet-initialised model that clearly learns the demo faces, then checks that Grad-CAM's heat of
correct predictions lies on the mouth, eyes and brows (the generator's `demo_regions.csv` says
where) far more than their area would explain (and that the hottest pixel falls inside them far more
often than chance: the "pointing game").
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

from benchmarks.shared_data import shared_missing, shared_path
from fer.core.config import make_config
from fer.core.errors import UserError
from fer.explain.gradcam import (
    GradCam,
    deletion_auc,
    deletion_curves,
    heat_in_regions,
    heat_share_in_boxes,
    overlay,
    peak_in_boxes,
    target_layer_name,
)
from fer.model.build import build_model, load_trained_model

WEIGHTS = shared_path("weights", "mobilenet_2_5_224_tf_no_top.h5")


needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=shared_missing(WEIGHTS))


@pytest.fixture(scope="module")
def tiny_model():
    """mobilenet025 at 64 px (2x2 Grad-CAM grid): ImageNet backbone, untrained head.

    Not random backbone weights: through 80 freshly initialised layers the activations vanish
    (~1e-17) and every gradient would be zero, which would make these tests pass for the wrong
    reason.
    """
    if not WEIGHTS.is_file():
        pytest.skip(shared_missing(WEIGHTS))
    return build_model(
        make_config(
            backbone="mobilenet025", image_size=64, weights=str(WEIGHTS), dense_units=8, seed=3
        ),
        5,
    )


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3)).astype(np.uint8)


def test_explanation_shapes_ranges_and_probabilities(tiny_model, images):
    cam = GradCam(tiny_model)
    assert (
        np.abs(cam.features.predict_on_batch(images.astype("float32"))).mean() > 1e-3
    )  # live activations
    assert (
        cam.layer_name == "conv_pw_13_relu" == target_layer_name(tiny_model)
    )  # the registry's choice
    e = cam.explain(images, batch_size=2)  # several batches, concatenated in order
    assert e.probs.shape == (5, 5) and e.gradcam.shape == e.gradcam_pp.shape == (5, 64, 64)
    np.testing.assert_allclose(
        e.probs, tiny_model.predict(images.astype("float32"), verbose=0), atol=1e-5
    )
    np.testing.assert_array_equal(e.class_ids, e.probs.argmax(axis=1))
    for heat in (e.gradcam, e.gradcam_pp):
        assert heat.min() >= 0.0 and heat.max() <= 1.0
    forced = cam.explain(images, class_ids=np.array([4, 3, 2, 1, 0]))
    np.testing.assert_array_equal(forced.class_ids, [4, 3, 2, 1, 0])


def test_backend_gradients_match_finite_differences(tiny_model, images):
    """The compiled gradient of the class logit w.r.t. the target activation, checked
    numerically."""
    cam = GradCam(tiny_model)
    acts = np.asarray(cam.features.predict_on_batch(images[:2].astype("float32")), np.float64)
    classes = np.array([1, 3], np.int32)
    grads, logits = cam._grad_fn(acts.astype(np.float32), classes)
    assert np.abs(grads).max() > 1e-4  # a real gradient, not a vanished one
    logit_fn = cam._head_logits_fn(tiny_model, tiny_model.get_layer(cam.layer_name))

    def logit(a):
        return np.asarray(keras.ops.convert_to_numpy(logit_fn(a.astype(np.float32))), np.float64)

    np.testing.assert_allclose(logit(acts), logits, rtol=1e-4, atol=1e-5)
    rng = np.random.default_rng(1)
    for _ in range(6):
        n, y, x, c = (rng.integers(0, s) for s in acts.shape)
        bumped = [acts.copy(), acts.copy()]
        eps = 1e-2
        bumped[0][n, y, x, c] += eps
        bumped[1][n, y, x, c] -= eps
        numeric = (logit(bumped[0])[n, classes[n]] - logit(bumped[1])[n, classes[n]]) / (2 * eps)
        assert abs(numeric - grads[n, y, x, c]) < 1e-3 + 1e-2 * abs(numeric)


def test_wrong_image_shape_is_a_user_error(tiny_model):
    with pytest.raises(UserError, match="expects images of shape"):
        GradCam(tiny_model).explain(np.zeros((2, 32, 32, 3), np.uint8))


def test_deletion_curves_start_at_the_prediction_and_end_at_the_blank_image(tiny_model, images):
    e = GradCam(tiny_model).explain(images)
    curves = deletion_curves(tiny_model, images, {"gradcam": e.gradcam}, e.class_ids, steps=4)
    assert set(curves) == {"gradcam", "random"} and all(len(c) == 5 for c in curves.values())
    start = e.probs[np.arange(5), e.class_ids].mean()
    assert curves["gradcam"][0] == pytest.approx(start, abs=1e-5) == curves["random"][0]
    # all pixels removed: both orderings end on the same mean-colour image
    assert curves["gradcam"][-1] == pytest.approx(curves["random"][-1], abs=1e-5)
    assert deletion_auc(np.array([1.0, 1.0, 0.0])) == pytest.approx(0.75)
    per_image = deletion_curves(
        tiny_model, images, {"gradcam": e.gradcam}, e.class_ids, steps=4, per_image=True
    )
    assert per_image["gradcam"].shape == (5, 5)
    np.testing.assert_allclose(per_image["gradcam"].mean(axis=0), curves["gradcam"], atol=1e-6)
    np.testing.assert_allclose(
        deletion_auc(np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])), [0.75, 0.25]
    )


def test_heat_share_in_boxes_and_overlay():
    heat = np.zeros((10, 10), np.float32)
    heat[0:5, 0:5] = 1.0
    share, area = heat_share_in_boxes(heat, [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)])
    assert share == pytest.approx(1.0) and area == pytest.approx(0.5)
    assert heat_share_in_boxes(np.zeros((4, 4)), [(0, 0, 1, 1)]) == (0.0, 1.0)
    assert peak_in_boxes(heat, [(0.0, 0.0, 0.5, 0.5)]) and not peak_in_boxes(
        heat, [(0.5, 0.5, 1.0, 1.0)]
    )
    both = heat_in_regions(
        np.stack([heat, np.ones((10, 10))]), [[(0.0, 0.0, 0.5, 0.5)], [(0.0, 0.0, 0.5, 0.5)]]
    )
    assert both["heat_share"] == pytest.approx((1.0 + 0.25) / 2) and both[
        "area_share"
    ] == pytest.approx(0.25)
    assert both["ratio"] == pytest.approx(2.5) and both["images"] == 2  # even heat would give 1
    out = overlay(np.full((10, 10, 3), 128, np.uint8), heat)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[9, 9])  # hot and cold pixels differ


FACE_SIZE = (
    224  # the 7x7 grid of mobilenet025 at 224 px is fine enough to tell the mouth from the eyes
)


@pytest.mark.slow
@needs_weights
def test_gradcam_heat_falls_on_the_face_features(tmp_path_factory):
    """Correct predictions of a model that learned the demo faces: heat on mouth/eyes/brows >> their
    area."""
    from fer.data import StudyData
    from fer.prepare import prepare_dataset
    from fer.prepare.demo_data import GROUP_REGEX, generate_demo_data
    from fer.train.trial import run_trial

    root = tmp_path_factory.mktemp("gradcam_face")
    generate_demo_data(root / "faces", per_class=40, seed=0)
    prepare_dataset(
        root / "faces",
        root / "data",
        group_regex=GROUP_REGEX,
        seed=0,
        image_size=FACE_SIZE,
        log=None,
    )
    data = StudyData(root / "data")
    config = make_config(
        backbone="mobilenet025",
        image_size=FACE_SIZE,
        weights=str(WEIGHTS),
        dense_units=64,
        dropout=0.2,
        batch_size=16,
        epochs_head=5,
        epochs_finetune=10,
        unfreeze_layers=100,
        augment=0.5,
        lr_head=3e-3,
        lr_finetune=1e-3,
        patience=4,
    )
    run_trial(config, data, root / "trial")
    model = load_trained_model(root / "trial" / "model.keras")

    regions = pd.read_csv(root / "faces" / "demo_regions.csv")
    boxes = {
        path: list(group[["x0", "y0", "x1", "y1"]].itertuples(index=False, name=None))
        for path, group in regions.groupby("path")
    }
    cam = GradCam(model)
    shares = {"gradcam": [], "gradcam_pp": []}
    peaks = {"gradcam": [], "gradcam_pp": []}
    areas, correct, total = [], 0, 0
    for split in ("val", "test"):
        e = cam.explain(np.asarray(data.pixels(split, FACE_SIZE)))
        labels, paths = data.labels(split), data.paths(split)
        total += len(labels)
        for i in np.flatnonzero(e.predicted == labels):
            correct += 1
            for name in shares:
                share, area = heat_share_in_boxes(getattr(e, name)[i], boxes[paths[i]])
                shares[name].append(share)
                peaks[name].append(peak_in_boxes(getattr(e, name)[i], boxes[paths[i]]))
            areas.append(area)
    assert correct / total >= 0.6, (
        f"the model did not learn the faces: accuracy {correct / total:.2f}"
    )
    area = float(np.mean(areas))
    gradcam_share = float(np.mean(shares["gradcam"]))
    print(
        f"correct {correct}/{total}; heat share in boxes: Grad-CAM {gradcam_share:.3f}, "
        f"Grad-CAM++ {np.mean(shares['gradcam_pp']):.3f}; boxes' area share {area:.3f}; "
        f"peak in boxes: Grad-CAM {np.mean(peaks['gradcam']):.3f}, "
        f"Grad-CAM++ {np.mean(peaks['gradcam_pp']):.3f}"
    )
    # measured here (2-core CPU, seed 0): 75/80 correct; heat share 0.41 (Grad-CAM) and 0.35
    # (Grad-CAM++) vs area 0.27; hottest pixel inside the boxes for 64% and 51% of the images (a
    # blind guess: 27%). With the demo faces at a random expression intensity (0.45-1, since the
    # demo must not be trivial): 70/80 correct; heat share 0.39 / 0.34 vs area 0.265; hottest pixel
    # inside for 59% / 37%, so Grad-CAM++'s peak check was 1.3x the area. Another batch order
    # (fit(shuffle=False), the same seed) gave 62/80 correct; heat share 0.40 / 0.34 vs area 0.26;
    # hottest pixel inside for 57% / 29%: Grad-CAM++'s peak is the least stable figure (its map
    # spreads over the face), so it is only required to beat a blind guess
    assert gradcam_share >= 1.35 * area, (gradcam_share, area)
    assert np.mean(peaks["gradcam"]) >= 2.0 * area, (np.mean(peaks["gradcam"]), area)
    assert np.mean(shares["gradcam_pp"]) >= 1.15 * area, (np.mean(shares["gradcam_pp"]), area)
    assert np.mean(peaks["gradcam_pp"]) > area, (np.mean(peaks["gradcam_pp"]), area)
