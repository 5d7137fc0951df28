"""Onboard use: the frame-stream commands (``--source`` of depth / segment, ``densert dense``) and
``densert ros2``. Their library code lives beside the rest of the runtime (``sources``, ``stream``,
``multitask``, ``speed``, ``ros2_node``); this package holds their command-line module."""
