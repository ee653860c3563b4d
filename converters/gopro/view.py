"""How ``arraystore show`` draws a ``gopro_spike`` frame: blur, sharp, and the spike stream's
voxel bins side by side as a strip (the stored ``spike_vox``, else summed from ``spike``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arraystore.kinds.gopro_spike import DEFAULT_BINS, KIND, spike_to_voxel
from arraystore.schema import Schema
from arraystore.views import Panel, View, field_panels

TEXT_FIELDS = ("split", "sequence", "frame", "frame_index")


class GoproView(View):
    kind = KIND

    def fields(self, schema: Schema, asked: Sequence[str]) -> tuple[str, ...]:
        if asked:
            return tuple(asked)
        spikes = "spike_vox" if "spike_vox" in schema else "spike"
        return ("blur", "sharp", spikes, *TEXT_FIELDS)

    def panels(self, sample: Mapping[str, Any], schema: Schema,
               asked: Sequence[str]) -> list[Panel]:
        if asked:
            return field_panels(sample, schema)
        if "spike_vox" in sample:
            voxels = sample["spike_vox"]
        else:
            frames = sample["spike"].shape[0]
            voxels = spike_to_voxel(sample["spike"],
                                    DEFAULT_BINS if frames % DEFAULT_BINS == 0 else frames)
        strip = np.concatenate(list(voxels), axis=1)
        return [
            Panel("blur", image=sample["blur"]),
            Panel("sharp", image=sample["sharp"]),
            Panel(f"spike voxels, bins 0-{len(voxels) - 1} left to right", image=strip,
                  cmap="magma", span=3),
            Panel("frame", text="\n".join(f"{n:12s} {sample[n]}" for n in TEXT_FIELDS)),
        ]
