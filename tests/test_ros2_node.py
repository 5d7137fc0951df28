"""``densert ros2`` as a real ROS 2 node: a subprocess runs the command, this test publishes
images and reads what comes back. Discovery is limited to this machine
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) on a private domain id, so no traffic leaves the
loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="densert[ros2] is not installed (no rclpy): the ROS 2 "
                                            "node tests need pip install 'densert[ros2]'")
from rclpy.qos import QoSProfile, qos_profile_sensor_data  # noqa: E402 - after importorskip
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402 - after importorskip
from std_msgs.msg import String  # noqa: E402 - after importorskip

ROOT = Path(__file__).resolve().parents[1]
FRAMES = [((64, 96), "rgb8"), ((80, 60), "bgr8"), ((48, 64), "mono8")]


@pytest.fixture
def ros_env(monkeypatch):
    """Loopback-only discovery on a domain id of our own (set before rclpy.init reads it)."""
    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(1 + os.getpid() % 100),
           "RMW_IMPLEMENTATION": "rmw_fastrtps_cpp"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ROS_STATIC_PEERS", raising=False)
    return {**os.environ, **env}


def _image(rng, hw, encoding, stamp):
    h, w = hw
    ch = 1 if encoding == "mono8" else 3
    arr = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
    arr[h // 2:, :, :] //= 3  # some structure: a darker lower half
    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec = stamp
    m.header.frame_id = "camera_optical"
    m.height, m.width, m.encoding, m.step = h, w, encoding, w * ch
    m.data = arr.tobytes()
    rgb = np.repeat(arr, 3, axis=2) if ch == 1 else (arr[..., ::-1] if encoding == "bgr8" else arr)
    return m, np.ascontiguousarray(rgb)


def _array(msg):
    dtype = {"32FC1": np.float32, "16UC1": np.uint16, "mono16": np.uint16, "rgb8": np.uint8}[msg.encoding]
    ch = 3 if msg.encoding == "rgb8" else 1
    a = np.frombuffer(bytes(msg.data), dtype=dtype)
    assert len(a) * a.itemsize == msg.step * msg.height
    return a.reshape(msg.height, msg.width, ch) if ch > 1 else a.reshape(msg.height, msg.width)


class _Client:
    """The test's own node: publishes images, collects every output topic."""

    def __init__(self):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node("densert_test_client", context=self.ctx)
        self.pub = self.node.create_publisher(Image, "image", qos_profile_sensor_data)
        self.info_pub = self.node.create_publisher(CameraInfo, "camera_info", qos_profile_sensor_data)
        self.got: dict[str, list] = {}
        for topic, typ in (("depth", Image), ("depth_mm", Image), ("labels", Image),
                           ("labels_color", Image), ("densert/diagnostics", String)):
            self.node.create_subscription(typ, topic, lambda m, t=topic: self.got.setdefault(t, []).append(m),
                                          QoSProfile(depth=10))
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)

    def wait_for_node(self, proc, pub, outputs=()):
        """Until the node's subscription matched ``pub`` and its output topics exist, then a
        moment for both sides of every match to settle (best-effort samples sent before that
        are lost)."""
        ok = self.spin_until(lambda: pub.get_subscription_count() > 0
                             and all(self.node.count_publishers(t) > 0 for t in outputs), 180, proc)
        self.spin_until(lambda: False, 1.0, proc)
        return ok

    def spin_until(self, cond, timeout, proc):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            if proc.poll() is not None:
                raise AssertionError(f"densert ros2 exited early ({proc.returncode}): "
                                     f"{proc.stderr.read()[-2000:]}")
            self.executor.spin_once(timeout_sec=0.1)
        return cond()

    def close(self):
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


def _start(env, *flags):
    return subprocess.Popen([sys.executable, "-m", "densert", "ros2", *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_ros2_node_publishes_depth_for_every_image(ros_env):
    from densert.runtime.predictor import DensePredictor
    proc = _start(ros_env, "--classes", "floor,wall", "--labels-color", "--max-frames", str(len(FRAMES)))
    client = _Client()
    try:
        assert client.wait_for_node(proc, client.pub, ("depth", "labels", "labels_color")), \
            "the node's image subscription or its output topics never appeared"
        rng = np.random.default_rng(0)
        sent = []
        for k, (hw, enc) in enumerate(FRAMES):
            msg, rgb = _image(rng, hw, enc, (1700000000 + k, 1000 * k + 7))
            client.pub.publish(msg)
            sent.append((msg, rgb))
            assert client.spin_until(lambda: len(client.got.get("depth", [])) > k, 120, proc), \
                f"no depth message for image {k}"
        assert client.spin_until(lambda: len(client.got.get("labels_color", [])) == len(FRAMES)
                                 and len(client.got.get("densert/diagnostics", [])) == len(FRAMES), 30, proc)
        proc.wait(timeout=60)  # --max-frames: the node stops by itself
        err = proc.stderr.read()
        assert proc.returncode == 0, err[-2000:]
    finally:
        _stop(proc)
        client.close()
    assert f"{len(FRAMES)} frame(s)" in err and "p50" in err  # the closing summary

    pred = DensePredictor()  # the node's defaults: bundled model, its declared preset
    for (msg, rgb), depth, labels, colour in zip(sent, client.got["depth"], client.got["labels"],
                                                 client.got["labels_color"]):
        for out, enc in ((depth, "32FC1"), (labels, "mono16"), (colour, "rgb8")):
            assert out.encoding == enc
            assert (out.height, out.width) == (msg.height, msg.width)
            assert (out.header.stamp.sec, out.header.stamp.nanosec) == \
                (msg.header.stamp.sec, msg.header.stamp.nanosec)
            assert out.header.frame_id == msg.header.frame_id
        ref = pred.dense(rgb, classes=["floor", "wall"])
        d = _array(depth)
        want = np.where(ref.depth.bins > 0, ref.depth.depth, np.nan).astype(np.float32)
        np.testing.assert_array_equal(d, want)  # NaN where invalid, metres elsewhere
        np.testing.assert_array_equal(_array(labels), ref.segmentation.labels)
        assert set(np.unique(_array(labels))) <= {0, 1}
    diag = json.loads(client.got["densert/diagnostics"][-1].data)
    assert diag["processed"] == len(FRAMES) and diag["received"] == len(FRAMES)
    assert diag["latency_ms"] > 0 and "prefill" in diag["stages_ms"] and diag["dropped"] == 0


@pytest.mark.slow
def test_ros2_camera_info_focal_gives_metric_depth_mm(ros_env):
    """Open world: fx from camera_info replaces --focal, so depth is metric and depth_mm flows.
    The preset and depth_mm come in as ROS parameters."""
    from densert.runtime.predictor import DensePredictor
    proc = _start(ros_env, "--max-frames", "1", "--quiet", "--ros-args", "-p", "preset:=open-world",
                  "-p", "depth_mm:=true")
    client = _Client()
    try:
        assert client.wait_for_node(proc, client.info_pub, ("depth_mm",))
        info = CameraInfo()
        info.k = [300.0, 0.0, 32.0, 0.0, 300.0, 24.0, 0.0, 0.0, 1.0]
        client.info_pub.publish(info)
        client.spin_until(lambda: False, 1.0, proc)  # let the camera_info arrive first
        msg, rgb = _image(np.random.default_rng(1), (96, 128), "rgb8", (5, 6))
        client.pub.publish(msg)
        assert client.spin_until(lambda: client.got.get("depth_mm"), 120, proc), "no depth_mm"
        proc.wait(timeout=60)
    finally:
        _stop(proc)
        client.close()
    ref = DensePredictor().depth(rgb, preset="open-world", focal=300.0)
    mm = _array(client.got["depth_mm"][0])
    assert mm.dtype == np.uint16 and mm.shape == (96, 128)
    want = np.rint(np.where(ref.bins > 0, ref.depth, 0) * 1000)
    np.testing.assert_array_equal(mm, np.where(want > 65535, 0, want).astype(np.uint16))


class _RigClient(_Client):
    """The test's node for a camera rig: an image publisher per camera, their outputs."""

    def __init__(self, cameras):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node("densert_rig_client", context=self.ctx)
        self.pubs = {c: self.node.create_publisher(Image, f"{c}/image", qos_profile_sensor_data)
                     for c in cameras}
        self.got: dict[str, list] = {}
        for c in cameras:
            for topic, typ in ((f"{c}/depth", Image), (f"densert/{c}/diagnostics", String)):
                self.node.create_subscription(typ, topic, lambda m, t=topic: self.got.setdefault(t, []).append(m),
                                              QoSProfile(depth=10))
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)


def test_ros2_two_cameras_publish_each_cameras_depth_and_stamp_from_one_process(ros_env):
    """``--cameras front,rear``: one process, one model; each camera's depth on its own topic with
    its own input header, and diagnostics per camera. float32 on both sides: the node and the
    reference compute the same arithmetic (a batched round included: test_rig.py)."""
    from densert.runtime.predictor import DensePredictor
    cams = ("front", "rear")
    sizes = {"front": (64, 96), "rear": (48, 64)}
    proc = _start(ros_env, "--cameras", ",".join(cams), "--dtype", "float32", "--max-frames", "2")
    client = _RigClient(cams)
    try:
        ok = all(client.wait_for_node(proc, client.pubs[c], (f"{c}/depth",)) for c in cams)
        assert ok, "the node's camera subscriptions or depth topics never appeared"
        pubs = {t: {i.node_name for i in client.node.get_publishers_info_by_topic(f"/{t}/depth")}
                for t in cams}
        assert pubs == {"front": {"densert"}, "rear": {"densert"}}   # one node publishes both
        rng = np.random.default_rng(3)
        sent = {c: [] for c in cams}
        for k in range(2):
            for j, c in enumerate(cams):
                msg, rgb = _image(rng, sizes[c], "rgb8", (1700000100 + 10 * j + k, 1000 * j + k))
                msg.header.frame_id = f"{c}_optical"
                client.pubs[c].publish(msg)
                sent[c].append((msg, rgb))
            assert client.spin_until(lambda: all(len(client.got.get(f"{c}/depth", [])) > k for c in cams),
                                     120, proc), f"no depth on both cameras for round {k}"
        assert client.spin_until(lambda: all(len(client.got.get(f"densert/{c}/diagnostics", [])) == 2
                                             for c in cams), 30, proc)
        proc.wait(timeout=60)  # --max-frames 2: every camera processed two, the node stops
        err = proc.stderr.read()
        assert proc.returncode == 0, err[-2000:]
    finally:
        _stop(proc)
        client.close()
    for c in cams:
        assert f"densert ros2 (depth) {c}: 2 frame(s)" in err   # a summary per camera
    pred = DensePredictor(dtype="float32")
    for c in cams:
        outs = client.got[f"{c}/depth"]
        assert len(outs) == 2
        for (msg, rgb), out in zip(sent[c], outs):
            assert (out.header.stamp.sec, out.header.stamp.nanosec) == \
                (msg.header.stamp.sec, msg.header.stamp.nanosec)
            assert out.header.frame_id == f"{c}_optical" and (out.height, out.width) == sizes[c]
            ref = pred.depth(rgb)
            np.testing.assert_array_equal(_array(out), np.where(ref.bins > 0, ref.depth, np.nan).astype(np.float32))
        diags = [json.loads(m.data) for m in client.got[f"densert/{c}/diagnostics"]]
        assert [d["camera"] for d in diags] == [c, c]
        assert [d["stamp"] for d in diags] == [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9
                                               for m, _ in sent[c]]
        assert diags[-1]["processed"] == 2 and diags[-1]["received"] == 2 and diags[-1]["dropped"] == 0
