"""Mixtures inside one model: DEMix domain MLPs (`demix`), BTX mixing a forest into one
Mixtral mixture-of-experts (`btx`), FlexOlmo-style anchored experts (`anchored`) merged into one
opt-out mixture (`anchored_moe`) with their honest FLOPs (`anchored_flops`), and the stages that
train the DEMix and BTX arms (`stages`)."""
