"""Network Dissection on the dataset's own concepts: the maths (pure functions on arrays and tensors).

``threshold`` finds each unit's top-quantile activation exactly with bounded memory, ``iou``
thresholds upsampled maps and accumulates their overlap with concept masks, ``concepts`` turns a
record's box, mask, fragment boxes and extra masks into concept masks, ``selectivity`` scores a unit's
class preference from labels alone.
"""
