"""The DICOM receiver (`ichscan listen`): a Storage SCP that stores pushed CT series durably,
analyses each complete series once, and writes a result JSON and a Structured Report per
series into a store that `ichscan serve --store DIR` reads for its worklist.

Modules: store (layout, durable writes, recovery scan), result (the JSON record), scp
(associations and the C-STORE handler), tracker (series completeness), worker and analyse
(the model on a complete series), sr (the Structured Report), forward (C-STORE of the SR to
another AE), service (the whole, and the `listen` verb). This package imports neither torch
nor pynetdicom until a receiver is built, so `ichscan.receive.store` is cheap to read from.
"""
