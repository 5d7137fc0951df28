import numpy as np
import pytest

from densert.training.classes import (
    CLASS_IDS,
    CLASS_NAMES,
    INDOOR_CLASSES,
    NUM_CLASSES,
    OUTDOOR_CLASSES,
    class_id,
)
from densert.training.scenes import _INTERSECT, OUTDOOR_MAX_DEPTH, Scene, _Prim, render_scene, write_samples

H, W = 64, 96


@pytest.fixture(scope="module")
def scenes():
    return {kind: [render_scene(s, H, W, kind) for s in range(4)] for kind in ("indoor", "outdoor")}


def test_class_list():
    assert 20 <= NUM_CLASSES < 255
    assert len(set(CLASS_NAMES)) == NUM_CLASSES
    assert set(INDOOR_CLASSES) | set(OUTDOOR_CLASSES) == set(CLASS_NAMES)
    assert class_id("sky") == CLASS_IDS["sky"]
    with pytest.raises(KeyError, match="unknown class"):
        class_id("unicorn")


def test_deterministic_per_seed():
    a, b = render_scene(7, H, W, "any"), render_scene(7, H, W, "any")
    for f in ("image", "depth", "labels", "instances"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.kind == b.kind and a.intrinsics == b.intrinsics
    c = render_scene(8, H, W, "any")
    assert not np.array_equal(a.image, c.image)


def test_kind_any_mixes_both():
    kinds = {render_scene(s, 16, 16, "any").kind for s in range(12)}
    assert kinds == {"indoor", "outdoor"}


def test_shapes_dtypes(scenes):
    for s in scenes["indoor"] + scenes["outdoor"]:
        assert isinstance(s, Scene)
        assert s.image.shape == (H, W, 3) and s.image.dtype == np.uint8
        assert s.depth.shape == (H, W) and s.depth.dtype == np.float32
        assert s.labels.shape == (H, W) and s.labels.dtype == np.uint8
        assert s.instances.shape == (H, W) and s.instances.dtype == np.uint16
        assert s.labels.max() < NUM_CLASSES
        assert s.intrinsics.cx == W / 2 and s.intrinsics.cy == H / 2 and s.intrinsics.fx > 0
        # every visible instance has a class, and its pixels carry that class
        for inst in np.unique(s.instances[s.instances > 0]):
            assert (s.labels[s.instances == inst] == s.instance_classes[int(inst)]).all()


def test_depth_ranges(scenes):
    for s in scenes["indoor"]:
        assert (s.depth > 0).all(), "a closed room has depth everywhere"
        assert s.depth.max() < 10.0 and s.depth.min() > 0.05
    for s in scenes["outdoor"]:
        sky = s.labels == CLASS_IDS["sky"]
        assert sky.any() and (s.depth[sky] == 0).all()
        assert s.depth.max() <= OUTDOOR_MAX_DEPTH
        assert (s.depth[~sky] >= 0).all()


def test_labels_cover_expected_classes(scenes):
    indoor = set().union(*(s.class_names_present() for s in scenes["indoor"]))
    outdoor = set().union(*(s.class_names_present() for s in scenes["outdoor"]))
    assert {"floor", "wall"} <= indoor and indoor <= set(INDOOR_CLASSES)
    assert len(indoor) >= 5
    assert {"sky", "road"} <= outdoor and outdoor <= set(OUTDOOR_CLASSES)
    assert len(outdoor) >= 5


def test_depth_matches_ground_plane_geometry(scenes):
    """On floor / road pixels, z-depth equals the analytic ray-plane intersection z = 0."""
    for s, cls in [(scenes["indoor"][0], "floor"), (scenes["outdoor"][0], "road")]:
        rays = s.ray_directions()
        cam = s.cam_to_world[:3, 3]
        m = (s.labels == CLASS_IDS[cls]) & (s.depth > 0)
        assert m.sum() > 50
        t = -cam[2] / rays[..., 2][m]
        np.testing.assert_allclose(s.depth[m], t, rtol=1e-5)
        # the hit point lies on the plane
        p = cam + s.depth[m][:, None].astype(np.float64) * rays[m]
        assert np.abs(p[:, 2]).max() < 1e-3 * max(1.0, s.depth[m].max())


def test_depth_is_z_not_range(scenes):
    s = scenes["indoor"][1]
    # ray directions have camera-z 1: depth * dir expressed in the camera frame has z == depth
    rays = s.ray_directions()
    cam_z = rays @ s.cam_to_world[:3, 2]
    np.testing.assert_allclose(cam_z, 1.0, atol=1e-9)


@pytest.mark.parametrize("shape,size", [("sphere", (0.5, 0.7, 0.3)), ("box", (0.5, 0.2, 0.4)),
                                        ("cyl", (0.4, 0.6)), ("cone", (0.5, 0.1, 0.4))])
def test_primitive_intersection_lands_on_surface(shape, size):
    """Rays from outside towards a primitive: hits satisfy its implicit surface equation."""
    rng = np.random.default_rng(0)
    o = np.array([0.2, -3.0, 0.1])
    d = np.stack([rng.uniform(-0.3, 0.3, 500), np.ones(500), rng.uniform(-0.3, 0.3, 500)], 1)
    t = _INTERSECT[shape](tuple(o), tuple(d.T), np.array(size))
    hit = np.isfinite(t)
    assert hit.sum() > 50 and (~hit).sum() > 10
    p = o + t[hit, None] * d[hit]
    x, y, z = p.T
    if shape == "sphere":
        err = (x / size[0]) ** 2 + (y / size[1]) ** 2 + (z / size[2]) ** 2 - 1
    elif shape == "box":
        err = np.max(np.abs(p) / np.array(size), 1) - 1
    else:
        r0, r1, hh = (size[0], size[0], size[1]) if shape == "cyl" else size
        rz = r0 + (r1 - r0) * (z + hh) / (2 * hh)
        side = np.abs(np.hypot(x, y) - rz)
        cap = np.abs(np.abs(z) - hh)
        err = np.minimum(side, cap)
    assert np.abs(err).max() < 1e-6
    # the first hit faces the ray: no point of the surface lies closer along the ray
    assert (t[hit] > 0).all()


def test_normals_are_unit_and_outward():
    p = _Prim("box", np.zeros(3), np.eye(3), np.array([1.0, 2.0, 3.0]), 0, 1, None)
    pts = np.array([[1.0, 0.5, 0.2], [0.1, -2.0, 1.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(p.normal(pts), [[1, 0, 0], [0, -1, 0], [0, 0, 1]])


def test_shadows_darken_lit_floor():
    """Outdoor pixels of the same class split into a lit and a shadowed brightness mode."""
    found = False
    for seed in range(6):
        s = render_scene(seed, 128, 160, "outdoor")
        road = s.image[s.labels == CLASS_IDS["road"]].mean(1)
        if road.size > 500 and np.percentile(road, 5) < 0.75 * np.median(road):
            found = True
            break
    assert found


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        render_scene(0, 32, 32, "space")
    with pytest.raises(ValueError, match="at least"):
        render_scene(0, 4, 32)


def test_write_samples(tmp_path):
    from PIL import Image

    paths = write_samples(tmp_path, [3], 32, 64, "indoor")
    assert paths == [tmp_path / "scene_3.png"]
    img = np.asarray(Image.open(paths[0]))
    np.testing.assert_array_equal(img, render_scene(3, 32, 64, "indoor").image)
    from densert.training.scenes import DEPTH_PNG_SCALE
    from densert.training.userdata import load_depth

    d = load_depth(tmp_path / "scene_3_depth.png", scale=DEPTH_PNG_SCALE)
    np.testing.assert_allclose(d, render_scene(3, 32, 64, "indoor").depth, atol=0.5 / DEPTH_PNG_SCALE)
    assert (tmp_path / "scene_3_label.png").is_file() and (tmp_path / "scene_3_meta.json").is_file()


@pytest.mark.slow
def test_render_speed_256():
    import time

    render_scene(0, 256, 256, "outdoor")
    t = time.process_time()
    for s in range(10):
        render_scene(s, 256, 256, "any")
    rate = 10 / (time.process_time() - t)
    assert rate >= 15, f"{rate:.1f} scenes/s of CPU time at 256x256"
