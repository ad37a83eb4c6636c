"""Pure tensor math: the Lion optimizer, codecs, votes and sync strategies. No I/O."""
