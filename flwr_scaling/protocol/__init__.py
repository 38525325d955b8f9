"""What both sides of the Flower glue share: the wire encodings of the preconditioner."""
