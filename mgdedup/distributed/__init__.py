"""Embedding on a cluster: `mgdedup index --engine ray`. Ray is an optional extra
(``pip install 'mgdedup[ray]'``); nothing here is imported by the local path."""
