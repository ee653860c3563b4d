"""The ``mask_embeddings`` kind (docs/formats.md): one SigLIP embedding per COCO panoptic segment,
computed at ingest (``arraystore ingest coco-embeddings``) or imported from the old
``inst2feat.tsv`` + ``.npy`` cache (``ingest vis-cache``, ``export tsv``)."""
