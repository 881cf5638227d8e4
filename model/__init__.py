"""SAM loading, encoding and decoding, independent of Label Studio and HTTP."""
