"""The released image processor: decoding (``decode``) and preprocessing (``preprocess``)."""

# The processor's geometry (preprocessor_config.json; equal to the vision config's patch_size and
# spatial_merge_size): 16x16 patches, merged 2x2 into one vision token of BLOCK x BLOCK pixels.
PATCH = 16
MERGE = 2
BLOCK = PATCH * MERGE
MIN_MAX_PATCHES = MERGE * MERGE  # one merged token: the smallest image the model can take
# The remote YoutuVLProcessor's patch cap (spec youtu-vl-checkpoint.md sec. 3 step 3): the largest
# image, in 16x16 patches, the processor lets through before it scales down.
DEFAULT_MAX_PATCHES = 36864
# The largest input densert takes, in pixels (100 MP, e.g. 10000 x 10000): its maps are made at
# the input's size, so this bounds what one image can cost (docs/tasks-and-outputs.md). Larger
# files, decompression bombs among them, are refused from their header before any decoding.
MAX_IMAGE_PIXELS = 100_000_000
