"""minc_rl.rl: the pieces under the SB3 agents. Their settings (settings: AuxConfig and the encoder names,
importable without torch so that the command line is checked in a blink), the project's encoders as an SB3
features extractor (extractor: MincExtractor) and the encoder-health callback (health: EncoderHealth). Imports
minc_rl.common, minc_rl.losses and minc_rl.ssl; minc_rl.agents builds on it."""
