"""One decomposition per module; each is a pure function returning a frozen factor container."""
