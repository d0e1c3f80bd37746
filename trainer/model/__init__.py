"""The GPT (UnifiedVoice) and its vocabulary: config, model, row surgery, weights in and out, transliteration."""
