"""The intervention (mask) modes: the one table of their names.

The routing kernel's launcher and its torch reference (``moetrace.kernels.routing``), ``Targets``'
checks and the experiment's ``modes`` all read it. Name -> what a masked expert gets:
"""

MASK_MODES: dict[str, str] = {
    "reroute": "its selection score is -inf, so the token goes to its next-best expert",
    "zero": "it stays selected with routing weight 0; the other experts keep their weights",
}
