"""The mistakes users make get an error at the call that makes them, never a silent wrong number:
inplace_backward on tensors it must not overwrite, double and second backward, labels that
are not token ids when only the distillation term is on, misspelt options."""

import pytest
import torch
from helpers import make_inputs, make_logits

import kdfast


def lm_head_logits(gen, rows=4, vocab=100, hidden=32):
    """(logits = hidden @ weight.T, the weight): logits as a model makes them, a non-leaf."""
    hidden_states = torch.randn(rows, hidden, generator=gen)
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_()
    return hidden_states @ weight.t(), weight


# --- inplace_backward ---

def test_inplace_backward_refuses_a_leaf_that_requires_grad(gen):
    s, t = make_logits(gen, (4, 100))
    leaf = s.requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite student_logits, a leaf tensor"):
        kdfast.kd_loss(leaf, t, inplace_backward=True)
    assert torch.equal(leaf.detach(), s.detach())  # untouched


def test_inplace_backward_of_a_layer_output_reaches_the_weight(gen):
    logits, weight = lm_head_logits(gen)
    _, t = make_logits(gen, (4, 100))
    expected_logits, expected_weight = logits.detach().clone().requires_grad_(), weight.detach().clone()
    kdfast.kd_loss(expected_logits, t, temperature=2.0).backward()
    kdfast.kd_loss(logits, t, temperature=2.0, inplace_backward=True).backward()
    torch.testing.assert_close(logits.detach(), expected_logits.grad)  # consumed: it holds the gradient
    assert weight.grad is not None and expected_weight.shape == weight.grad.shape


def test_a_use_of_the_logits_saved_before_the_overwrite_raises_pytorchs_inplace_error(gen):
    logits, weight = lm_head_logits(gen)
    _, t = make_logits(gen, (4, 100))
    other = logits * torch.randn(4, 100, requires_grad=True)  # saves logits for its backward
    loss = kdfast.kd_loss(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other.sum()).backward()


def test_inplace_backward_refuses_rows_that_share_memory(gen):
    row, _ = lm_head_logits(gen, rows=1)
    _, t = make_logits(gen, (4, 100))
    with pytest.raises(ValueError, match="some of its rows share memory"):
        kdfast.kd_loss(row.expand(4, 100), t, inplace_backward=True)


def test_inplace_backward_refuses_a_student_that_shares_memory_with_the_teacher(gen):
    logits, _ = lm_head_logits(gen, rows=5)
    with pytest.raises(ValueError, match="share memory with teacher_logits"):
        kdfast.kd_loss(logits[:-1], logits[1:].detach(), inplace_backward=True)  # self-distillation, shifted
    kdfast.kd_loss(logits[:-1], logits[1:].detach().clone(), inplace_backward=True).backward()  # a copy is fine


# --- backward ---

def test_double_backward_is_refused_at_the_call(gen):
    s, t = make_logits(gen, (4, 50))
    s.requires_grad_()
    loss = kdfast.kd_loss(s, t)
    with pytest.raises(RuntimeError, match="kd_loss has no second derivative.*create_graph=True"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_fused_linear_double_backward_is_refused_at_the_call(gen):
    inputs = make_inputs(gen, 6, 8, 8, 30)
    hidden = inputs["student_hidden"].requires_grad_()
    loss = kdfast.fused_linear_kd_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                       inputs["teacher_weight"])
    with pytest.raises(RuntimeError, match="fused_linear_kd_loss has no second derivative"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_second_backward_names_its_cause(gen):
    s, t = make_logits(gen, (4, 50))
    s.requires_grad_()
    loss = kdfast.kd_loss(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="kd_loss's backward already ran for this forward.*retain_graph=True"):
        loss.backward()


def test_fused_linear_second_backward_is_refused_not_scaled_twice(gen):
    inputs = make_inputs(gen, 6, 8, 8, 30)
    hidden = inputs["student_hidden"].requires_grad_()
    loss = kdfast.fused_linear_kd_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                       inputs["teacher_weight"])
    (0.5 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_kd_loss's backward already ran"):
        (0.5 * loss).backward()


def test_fused_linear_per_row_loss_recomputes_so_a_second_backward_is_exact(gen):
    inputs = make_inputs(gen, 6, 8, 8, 30)
    hidden = inputs["student_hidden"].requires_grad_()
    rows = kdfast.fused_linear_kd_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                       inputs["teacher_weight"], reduction="none")
    rows.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    rows.sum().backward()
    torch.testing.assert_close(hidden.grad, 2 * first)


# --- labels and options ---

@pytest.mark.parametrize("bad", [-1, 100, 1000])
def test_labels_are_checked_without_the_hard_label_term(gen, bad):
    s, t = make_logits(gen, (4, 100))
    labels = torch.tensor([3, bad, -100, 7])
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 100\) or equal ignore_index=-100; found {bad}"):
        kdfast.kd_loss(s, t, labels=labels)  # hard_weight=0: labels still decide which rows count


def test_padding_id_labels_are_fine_when_they_are_the_ignore_index(gen):
    s, t = make_logits(gen, (4, 100))
    labels = torch.tensor([3, -1, -1, 7])
    loss = kdfast.kd_loss(s, t, labels=labels, ignore_index=-1)
    expected = kdfast.kd_loss(s[[0, 3]], t[[0, 3]])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("call,pattern", [
    (lambda i: kdfast.fused_linear_kd_loss(i["student_hidden"], i["student_weight"], i["teacher_hidden"],
                                           i["teacher_weight"], chunksize=4),
     r"fused_linear_kd_loss\(\) got an unexpected keyword argument 'chunksize'; did you mean 'chunk_size'\?"),
    (lambda i: kdfast.FusedLinearKDLoss(temprature=2.0),
     r"FusedLinearKDLoss\(\) got an unexpected keyword argument 'temprature'; did you mean 'temperature'\?"),
    (lambda i: kdfast.KDLoss(hardweight=0.5),
     r"KDLoss\(\) got an unexpected keyword argument 'hardweight'; did you mean 'hard_weight'\?"),
])
def test_a_misspelt_option_is_named_against_the_function_called(gen, call, pattern):
    with pytest.raises(TypeError, match=pattern) as error:
        call(make_inputs(gen, 4, 8, 8, 20))
    assert "valid keywords:" in str(error.value) and "temperature" in str(error.value)



# --- signatures: only the four tensors of the fused loss are positional ---

def test_fused_linear_labels_can_never_be_taken_for_a_bias(gen):
    """Liger's order is (..., labels); kdfast's fifth positional argument used to be student_bias."""
    n = vocab = 12  # N == V: a positional labels tensor would fit a bias's shape
    i = make_inputs(gen, n, 8, 8, vocab)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    with pytest.raises(TypeError, match="positional argument"):
        kdfast.fused_linear_kd_loss(i["student_hidden"], i["student_weight"], i["teacher_hidden"],
                                    i["teacher_weight"], labels)
    with pytest.raises(TypeError, match="positional argument"):
        kdfast.FusedLinearKDLoss()(i["student_hidden"], i["student_weight"], i["teacher_hidden"],
                                   i["teacher_weight"], labels)


@pytest.mark.parametrize("name", ["student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                                  "student_bias", "teacher_bias"])
def test_an_integer_tensor_where_floats_belong_is_a_type_error_naming_it(gen, name):
    i = make_inputs(gen, 12, 8, 8, 12)
    i[name] = i[name].long()
    with pytest.raises(TypeError, match=f"{name} must be a floating-point torch.Tensor, got torch.int64"):
        kdfast.fused_linear_kd_loss(**i)


def test_labels_with_one_entry_per_row_are_read_in_row_major_order(gen):
    """torchtune passes (B, S) labels with logits flattened to (B * S, V)."""
    s, t = make_logits(gen, (2, 5, 30))
    labels = torch.randint(0, 30, (2, 5), generator=gen)
    labels[0, 1] = -100
    flat = kdfast.kd_loss(s.reshape(10, 30), t.reshape(10, 30), labels=labels, hard_weight=0.5)
    torch.testing.assert_close(flat, kdfast.kd_loss(s, t, labels=labels, hard_weight=0.5))
    with pytest.raises(ValueError, match=r"reshape them to \(10,\).*labels\[:, 1:\]"):
        kdfast.kd_loss(s.reshape(10, 30), t.reshape(10, 30), labels=labels[:, :4])
