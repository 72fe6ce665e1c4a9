import torch


def test_w8a8_accuracy_within_one_point_of_float(digits, digits_quantized):
    model, _, _, xte, yte = digits
    qm, _ = digits_quantized
    with torch.no_grad():
        fp_acc = (model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean() * 100
    res = qm.evaluate(xte, None)
    q_acc = (qm.simulate(xte).argmax(1) == yte).mean() * 100
    assert fp_acc > 90, "the test model itself must be good for the comparison to mean anything"
    assert q_acc >= fp_acc - 1.0
    assert res["top1_agreement"] >= 97.0


def test_w4a8_is_worse_than_w8a8_but_runs(digits):
    import ptq
    model, xtr, _, xte, _ = digits
    q4 = ptq.quantize(model, xtr[:256], "w4a8", eval_data=xte[:128])
    q8 = ptq.quantize(model, xtr[:256], "w8a8", eval_data=xte[:128])
    assert q4.report["fidelity"]["kl"] >= q8.report["fidelity"]["kl"]
    assert q4.report["mean_weight_bits"] < 8


def test_report_times_every_stage(digits_quantized):
    """report.json's stage_seconds names each stage and adds up to the whole quantize (no stage is missed)."""
    qm, _ = digits_quantized
    st = qm.report["stage_seconds"]
    assert list(st) == ["load_and_capture", "statistics", "method", "manifest", "bias_correction", "verification",
                        "evaluation"]
    assert all(v >= 0 for v in st.values())
    assert abs(sum(st.values()) - qm.report["seconds"]) < 0.05 * qm.report["seconds"] + 0.01
