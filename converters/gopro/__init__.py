"""The ``gopro_spike`` dataset kind: GoPro blur/sharp frames with spike-camera streams
(docs/formats.md) from a ``ROOT/<split>/<SEQ>/{blur,sharp,spike}/`` folder tree into a store."""
