"""gpuopt inside the frameworks people train with: Hugging Face ``transformers`` Trainer, PyTorch
Lightning and ``accelerate``. Each run is compared with the same run on ``torch.optim`` (the
frameworks' own clipping, accumulation, schedulers and checkpoints around it), and each resume
from a checkpoint with the run that was not interrupted."""

import pytest
import torch

import gpuopt

from .helpers import assert_close

# fp32 AdamW in gpuopt and torch agree to a few ulps a step; after the runs below, to ~1e-5.
RTOL, ATOL = 1e-4, 1e-5


def _parameters(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same_parameters(actual: dict, expected: dict, what: str):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], rtol=RTOL, atol=ATOL, name=f"{what}: {name}")


# ------------------------------------------------------------------------ transformers Trainer


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, length=16, vocab=61):
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(vocab, (n, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _trainer(model, output_dir, optimizers=None, max_steps=6, **extra):
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                                          learning_rate=3e-3, weight_decay=0.01, max_grad_norm=0.5,
                                          save_strategy="steps", save_steps=3, report_to=[], use_cpu=True,
                                          logging_steps=1, seed=0, data_seed=0, disable_tqdm=True,
                                          lr_scheduler_type="linear", warmup_steps=2)
    kwargs = dict(model=model, args=args, train_dataset=_Tokens(), **extra)
    if optimizers is not None:
        kwargs["optimizers"] = optimizers
    return transformers.Trainer(**kwargs)


def test_transformers_trainer_with_gpuopt_matches_torch_and_resumes(tmp_path):
    runs = {}
    for name, make in (("torch", lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.01)),
                       ("gpuopt", lambda ps: gpuopt.AdamW(ps, lr=3e-3, weight_decay=0.01))):
        model = _tiny_gpt2()
        assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter, listed once
        trainer = _trainer(model, tmp_path / name, optimizers=(make(model.parameters()), None))
        result = trainer.train()
        runs[name] = (_parameters(model), result.training_loss)
    _assert_same_parameters(runs["gpuopt"][0], runs["torch"][0], "Trainer, gpuopt vs torch")
    assert runs["gpuopt"][1] == pytest.approx(runs["torch"][1], rel=1e-4)

    # Resumed from the step-3 checkpoint of the gpuopt run above.
    model = _tiny_gpt2()
    trainer = _trainer(model, tmp_path / "gpuopt", optimizers=(gpuopt.AdamW(model.parameters(), lr=3e-3,
                                                                             weight_decay=0.01), None))
    trainer.train(resume_from_checkpoint=str(tmp_path / "gpuopt" / "checkpoint-3"))
    _assert_same_parameters(_parameters(model), runs["gpuopt"][0], "Trainer resumed")

    # A torch.optim checkpoint resumed by gpuopt.
    model = _tiny_gpt2()
    trainer = _trainer(model, tmp_path / "torch", optimizers=(gpuopt.AdamW(model.parameters(), lr=3e-3,
                                                                             weight_decay=0.01), None))
    trainer.train(resume_from_checkpoint=str(tmp_path / "torch" / "checkpoint-3"))
    _assert_same_parameters(_parameters(model), runs["torch"][0], "torch checkpoint resumed by gpuopt")


def test_transformers_trainer_builds_gpuopt_from_optimizer_cls_and_kwargs(tmp_path):
    """The Trainer makes the optimizer itself: its lr, weight decay and no-decay group for biases
    and LayerNorm weights, then resumes it from a checkpoint."""
    runs = {}
    for name, cls in (("torch", torch.optim.AdamW), ("gpuopt", gpuopt.AdamW)):
        model = _tiny_gpt2()
        trainer = _trainer(model, tmp_path / name, optimizer_cls_and_kwargs=(cls, {"betas": (0.9, 0.99)}))
        trainer.train()
        assert type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)) is cls
        assert len(trainer.optimizer.param_groups) == 2
        runs[name] = _parameters(model)
    _assert_same_parameters(runs["gpuopt"], runs["torch"], "Trainer optimizer_cls_and_kwargs")
    model = _tiny_gpt2()
    trainer = _trainer(model, tmp_path / "gpuopt", optimizer_cls_and_kwargs=(gpuopt.AdamW, {"betas": (0.9, 0.99)}))
    trainer.train(resume_from_checkpoint=str(tmp_path / "gpuopt" / "checkpoint-3"))
    _assert_same_parameters(_parameters(model), runs["gpuopt"], "Trainer resumed (optimizer_cls_and_kwargs)")


# ------------------------------------------------------------------------------------ Lightning


def _lightning_module(optimizer: str, manual: bool):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
            self.automatic_optimization = not manual

        def training_step(self, batch, index):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                if optimizer == "gpuopt":
                    opt.clip_grad_norm_(0.3)  # fused into the step, through Lightning's wrapper
                else:
                    torch.nn.utils.clip_grad_norm_(self.parameters(), 0.3)
                opt.step()
                self.lr_schedulers().step()
            return loss

        def configure_optimizers(self):
            cls = gpuopt.AdamW if optimizer == "gpuopt" else torch.optim.AdamW
            opt = cls(self.parameters(), lr=0.05, weight_decay=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(3)
            x, y = torch.randn(40, 7, generator=generator), torch.randint(3, (40,), generator=generator)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    return Module()


def _fit(module, max_epochs, root, ckpt_path=None, manual=False):
    pl = pytest.importorskip("lightning.pytorch")
    extra = {} if manual else dict(gradient_clip_val=0.3, accumulate_grad_batches=2)
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root), **extra)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_with_gpuopt_matches_torch_and_resumes(tmp_path, manual):
    results = {}
    for optimizer in ("torch", "gpuopt"):
        module = _lightning_module(optimizer, manual)
        _fit(module, 3, tmp_path / optimizer, manual=manual)
        results[optimizer] = _parameters(module)
    _assert_same_parameters(results["gpuopt"], results["torch"], "Lightning, gpuopt vs torch")

    module = _lightning_module("gpuopt", manual)
    trainer = _fit(module, 1, tmp_path / "first", manual=manual)
    checkpoint = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = _lightning_module("gpuopt", manual)
    _fit(resumed, 3, tmp_path / "resumed", ckpt_path=str(checkpoint), manual=manual)
    _assert_same_parameters(_parameters(resumed), results["gpuopt"], "Lightning resumed")


# ----------------------------------------------------------------------------------- accelerate


def _accelerate_run(optimizer, steps, directory, save_at=None, load=False):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.ReLU(), torch.nn.Linear(12, 2))
    cls = gpuopt.AdamW if optimizer == "gpuopt" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=0.02)
    generator = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(32, 5, generator=generator), torch.randn(32, 2, generator=generator))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    if load:
        accelerator.load_state(str(directory))
    batches = [batch for _ in range(3) for batch in loader]
    first = save_at if load else 0
    for step in range(first, steps):
        x, y = batches[step]
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 0.2)
        opt.step()
        opt.zero_grad()
        if save_at is not None and not load and step + 1 == save_at:
            accelerator.save_state(str(directory))
    return _parameters(accelerator.unwrap_model(model))


def test_accelerate_with_gpuopt_matches_torch_and_resumes(tmp_path):
    expected = _accelerate_run("torch", 8, tmp_path / "torch")
    actual = _accelerate_run("gpuopt", 8, tmp_path / "gpuopt", save_at=4)
    _assert_same_parameters(actual, expected, "accelerate, gpuopt vs torch")
    resumed = _accelerate_run("gpuopt", 8, tmp_path / "gpuopt", save_at=4, load=True)
    _assert_same_parameters(resumed, actual, "accelerate resumed")


def test_frameworks_are_installed_by_the_test_command():
    """The test extra installs them: a missing one must fail, not skip, in CI."""
    for name in ("transformers", "lightning", "accelerate"):
        __import__(name)
