"""The released model's task contract, in one place for the runtime, the exporter and the trainer:
task names (here), prompts (``prompts``), depth bins and presets (``depth_bins``), the class-name
token rule (``classes``), the answer formats and the referring crop (``grounding``, ``rle``).
Torch-free, so the CLI can declare its choices from it."""

TASKS = ("depth", "segment", "refer", "detect", "ground", "pose", "chat")
# Maps read off the vision tokens: what the dense head decodes and the trainer trains.
DENSE_TASKS = ("depth", "segment", "refer")
# Flows that generate text: segmentation names its classes (the closed set unless --fast), refer
# grounds a box, detect / ground / pose / chat answer. Depth needs one prefill only.
GENERATING_TASKS = ("segment", "refer", "detect", "ground", "pose", "chat")
# Which hidden state scores merged cell k: "k" = the k-th image-pad position itself (our default:
# the paper reads each vision token's own output), "k-1" = the next-token shift, cell 0 read from
# <|vision_start|>. The released rule is unknown (spec sec. 9.2, unknown 1).
ALIGNMENTS = ("k", "k-1")
