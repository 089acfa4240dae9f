"""Explanations: Grad-CAM and Grad-CAM++ (`gradcam`) and the checks that say whether its maps
explain anything (`map_checks`: deletion/insertion, model randomisation, same-map test, readable
layer)."""
