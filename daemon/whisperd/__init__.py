"""whisperd: watch inbox folders and transcribe recordings with Whisper."""

__version__ = "0.1.0"
