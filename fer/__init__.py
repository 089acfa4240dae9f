"""fer: the facial-emotion-recognition library behind fer-study.

Data preparation, backbones, two-stage training, evaluation and Grad-CAM. This package never imports
Ray (only `study/` does), so a trial runs on a machine that has only Keras and one backend (e.g.
JAX).
"""

CLASSES = ("angry", "fear", "happy", "sad", "surprise")

__version__ = "0.1.0"
