"""Where the export's weights come from: the tiny default, random presets, an HF checkpoint, a Megatron dist
checkpoint or a live model; each kind is registered in ``registry``."""
