"""Named models the project can always run (tiny-shapes, digits) and real loading code for
big ones (sd21, any diffusers SD-family directory)."""
