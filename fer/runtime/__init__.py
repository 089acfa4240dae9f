"""The machine a trial runs on: the Keras backend's set-up (`backend`: threads, GPU memory, compile
cache), backend-specific gradients (`gradients`, for Grad-CAM), the GPUs a backend can use
(`devices`) and the machine description (`machine`). With `gradients`, `backend` is the only place
that imports TensorFlow or JAX."""
