"""The cache floor: paged KV storage, page pools and tables, sizing from free memory, the
cache config and the statistics snapshot every cache gives."""
