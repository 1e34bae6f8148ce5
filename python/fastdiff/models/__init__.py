"""Named models the project can always run (tiny-shapes, digits) and real loading code for
big ones (sd21, any diffusers SD-family directory).

loading.py holds the shared loaders, registry.py the name -> loader table (build_engine), one
module per model its definition and ``load_engine``, training/ the training code. Model modules
import loading, never the registry.
"""
