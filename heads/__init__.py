"""Caption and VQA heads over stored region features (the "top-down" half of BUTD).

Public API:
    regions.RegionBatch, regions.collate_records       padded (B, K, D) batches + mask + boxes
    decoding.Captioner + captioners.CaptionerConfig     Up-Down / SAT / adaptive, one decoder loop
    vqa.UpDownVQA + VQAConfig, ban.BAN + BANConfig      VQA heads; counter.Counter
    metrics.vqa_accuracy, metrics.captions, metrics.evaluate   official metrics
    data, vocab                                          COCO / Karpathy / VQA v2 readers
    train.fit, objectives                                training loop, losses, SCST
    inference.load_head / caption / answer               trained heads from checkpoints
    visualise.attention_panels                           attention drawing
    synth, benchmark                                     the simulated-feature benchmark
"""
