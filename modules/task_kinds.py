"""The task kinds of fine-tuning data and the columns their records need.

Record kinds (one kind per dataset, from a ``type`` column or the meta list):
  retri_contrast  text, text_pos (str or list), text_neg (list; needed when negatives are used)
  cls_contrast    text, text_pos (str or list), text_neg (list)
  cosent          text, text_pair, label (number)
  parallel        text, text_pos (str or list): a source and its translations
"""


TASK_KINDS = ("retri_contrast", "cls_contrast", "cosent", "parallel")
CONTRASTIVE_KINDS = ("retri_contrast", "cls_contrast")


REQUIRED_COLUMNS = {
    "retri_contrast": lambda needs_negatives: ("text", "text_pos") + (("text_neg",) if needs_negatives else ()),
    "cls_contrast": lambda needs_negatives: ("text", "text_pos") + (("text_neg",) if needs_negatives else ()),
    "cosent": lambda needs_negatives: ("text", "text_pair", "label"),
    "parallel": lambda needs_negatives: ("text", "text_pos"),
}
