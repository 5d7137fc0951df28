"""How a class name becomes token ids: the dense head's category score and the trainer's
positives read the same ids (mean of their logits, method spec sec. 2)."""
from __future__ import annotations

from densert.errors import TokenizerError

# Class names are tokenised bare ("tree"), the way the model spells them after <ref> in its own
# answers, not " tree" as inside a sentence. The released rule is unknown (spec sec. 9.2,
# unknown 2): this is our default, and DenseOptions.name_leading_space overrides it at run time.
NAME_LEADING_SPACE = False


def name_ids(vocab, name: str, leading_space: bool = NAME_LEADING_SPACE) -> list[int]:
    """Sub-word ids of a class name (``" " + name`` with ``leading_space``)."""
    name = name.strip()
    if not name:
        raise ValueError("class name is empty")
    ids = vocab.encode((" " if leading_space else "") + name)
    if not ids:
        raise TokenizerError(f"class name {name!r} encodes to no tokens with {vocab.source}")
    return ids


def class_id_groups(vocab, names: list[str], leading_space: bool = NAME_LEADING_SPACE
                    ) -> list[list[int]]:
    """Token ids per class: a special token (``<FG>``, ``<OTHERS>``) is its own single id,
    anything else the sub-word ids of its name."""
    groups = []
    for n in names:
        tid = vocab.tok.token_to_id(n) if n.startswith("<") and n.endswith(">") else None
        groups.append([tid] if tid is not None else name_ids(vocab, n, leading_space))
    return groups
