"""The drivers that execute a :class:`~compress.planning.RunPlan`: in memory (:mod:`.engine`), a model
loaded whole (:mod:`.whole`) or streamed layer by layer from its checkpoint (:mod:`.streamed`), then
the steps after the checkpoint is written (:mod:`.finish`)."""
