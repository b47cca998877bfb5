"""A toy KV press, "keep the last N tokens", added to accel the way docs/adding_a_method.md says:
five places and nothing in accel itself.

    config.py   (1) the config dataclass
    kernel/     (2) the kernel folder: reference.py (the math, plainly) and cpu.py (the fast path)
    runtime.py  (3) the applier: a PressHandler installed with install_press
    calibrate.py(4) the calibrator (trivial: it records the model's attention shape)
    here        (5) the manifest row

Importing this package adds the row and nothing else: each registry imports the module it
needs from the row on first use. tests/test_adding_a_method.py drives it end to end.
"""
import accel.methods

accel.methods.add_method("keep-last", config=f"{__name__}.config", runtime=f"{__name__}.runtime",
                         calibrator=f"{__name__}.calibrate")
