"""Archive, compressor and document-container decoders.

One module a family; importing this package registers them all. Each
module says why it reads its format in-process or through an external tool.
"""

from amavisd.decode.archives import (  # noqa: F401  (imported to register)
    cab,
    cpio,
    freeze,
    iso,
    legacy,
    office,
    packages,
    rar,
    sevenzip,
    sfx,
    tar,
    zip,
)
