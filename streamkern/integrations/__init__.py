"""Drop-in acceleration of published streaming-video code.

Each submodule patches one outside library's models in place and imports that library only when called:
``streamkern.integrations.fastvideo.accelerate(model)`` (FastVideo's causal Wan and Matrix-Game 2.0).
"""
