"""``gateway doctor`` (checks, in the manner of ``iotedge check``) and ``gateway support-bundle``."""
