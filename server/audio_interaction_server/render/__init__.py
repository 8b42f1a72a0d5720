"""Token events -> user-facing text: the detokenizer, replies, the sentence segmenter."""
