"""The Solana instructions payment messages are made of (pure: no I/O).

The plain escrow (:mod:`jupyter_io.payments.escrow`) and the cohort pools
(:mod:`jupyter_io.payments.cohort_pool`) build their messages from these: accounts at
addresses derived with ``create_account_with_seed`` (an SPL multisig, a wrapped-SOL token
account), wSOL moved or closed by an owner and its co-signers, SOL passed on. Each function
returns exactly the instructions the messages carried before they were shared, so a message
built here is byte for byte what the other party rebuilds and compares.

Also the instruction tags a party reads back out of a message it is asked to sign
(:func:`transfer_amounts`, ``closing_transaction``).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from solders.hash import Hash
from solders.instruction import Instruction
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.system_program import (
    CreateAccountWithSeedParams,
    TransferParams,
    create_account_with_seed,
    transfer,
)
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    close_account,
    initialize_account3,
    initialize_multisig2,
    sync_native,
    transfer_checked,
)
from spl.token.models import (
    CloseAccountParams,
    InitializeAccount3Params,
    InitializeMultisig2Params,
    SyncNativeParams,
    TransferCheckedParams,
)

from .token_accounts import ACCOUNT_LEN, MULTISIG_LEN, NATIVE_DECIMALS, NATIVE_MINT

__all__ = [
    "CLOSE_ACCOUNT_TAG",
    "CREATE_WITH_SEED_TAG",
    "SYSTEM_TRANSFER_TAG",
    "TRANSFER_CHECKED_TAG",
    "close_wsol",
    "compile_message",
    "create_multisig",
    "create_wsol_account",
    "derived_seed",
    "move_wsol",
    "pay_sol",
    "transfer_amounts",
    "wrap_sol",
]

#: First byte of SPL Token's CloseAccount instruction data.
CLOSE_ACCOUNT_TAG = 9
#: First byte of SPL Token's TransferChecked instruction data (then amount u64, decimals u8).
TRANSFER_CHECKED_TAG = 12
#: First 4 bytes of the System program's Transfer instruction data (then lamports u64).
SYSTEM_TRANSFER_TAG = (2).to_bytes(4, "little")
#: First 4 bytes of the System program's CreateAccountWithSeed instruction data.
CREATE_WITH_SEED_TAG = (3).to_bytes(4, "little")


def derived_seed(domain: bytes, kind: str, body: bytes) -> str:
    """A ``create_account_with_seed`` seed: ``jio-`` + the first two letters of ``kind`` +
    25 base64url characters (150 bits) of SHA-256(domain, kind, body); 32 bytes, a seed's
    limit."""
    digest = hashlib.sha256(domain + kind.encode() + body).digest()
    return f"jio-{kind[:2]}-" + base64.urlsafe_b64encode(digest).decode()[:25]


def compile_message(
    payer: Pubkey, instructions: Sequence[Instruction], blockhash: Hash
) -> MessageV0:
    """A v0 message (no lookup tables) of ``instructions``, ``payer`` paying the fee."""
    return MessageV0.try_compile(payer, list(instructions), [], blockhash)


def _create_token_program_account(
    payer: Pubkey, base: Pubkey, seed: str, address: Pubkey, lamports: int, space: int
) -> Instruction:
    return create_account_with_seed(
        CreateAccountWithSeedParams(
            from_pubkey=payer,
            to_pubkey=address,
            base=base,
            seed=seed,
            lamports=lamports,
            space=space,
            owner=TOKEN_PROGRAM_ID,
        )
    )


def create_multisig(
    *,
    payer: Pubkey,
    base: Pubkey,
    seed: str,
    address: Pubkey,
    rent: int,
    threshold: int,
    signers: Sequence[Pubkey],
) -> list[Instruction]:
    """Create the SPL multisig at ``address`` (derived from ``base`` and ``seed``; ``payer``
    pays ``rent``) and initialise it ``threshold``-of-``signers``, in that order."""
    return [
        _create_token_program_account(payer, base, seed, address, rent, MULTISIG_LEN),
        initialize_multisig2(
            InitializeMultisig2Params(
                program_id=TOKEN_PROGRAM_ID,
                multisig=address,
                m=threshold,
                signers=list(signers),
            )
        ),
    ]


def create_wsol_account(
    *,
    payer: Pubkey,
    base: Pubkey,
    seed: str,
    address: Pubkey,
    lamports: int,
    owner: Pubkey,
) -> list[Instruction]:
    """Create the wrapped-SOL token account at ``address`` (derived from ``base`` and
    ``seed``) with ``lamports`` (its rent plus what it is to hold) from ``payer``, and
    initialise it for ``owner``. A native account's amount is its lamports above the rent
    reserve: no SyncNative needed."""
    return [
        _create_token_program_account(payer, base, seed, address, lamports, ACCOUNT_LEN),
        initialize_account3(
            InitializeAccount3Params(
                program_id=TOKEN_PROGRAM_ID,
                account=address,
                mint=NATIVE_MINT,
                owner=owner,
            )
        ),
    ]


def wrap_sol(*, payer: Pubkey, account: Pubkey, lamports: int) -> list[Instruction]:
    """Move ``lamports`` of SOL from ``payer`` into the wSOL ``account``, then SyncNative so
    its token amount counts them (which fails, and the transaction with it, if ``account`` is
    no longer a wSOL account)."""
    return [
        transfer(TransferParams(from_pubkey=payer, to_pubkey=account, lamports=lamports)),
        sync_native(SyncNativeParams(program_id=TOKEN_PROGRAM_ID, account=account)),
    ]


def move_wsol(
    *, source: Pubkey, dest: Pubkey, owner: Pubkey, amount: int, signers: Sequence[Pubkey]
) -> Instruction:
    """TransferChecked of ``amount`` wSOL lamports from ``source`` to ``dest``, authorised by
    ``owner`` (its owner or delegate) with the multisig co-signers ``signers``."""
    return transfer_checked(
        TransferCheckedParams(
            program_id=TOKEN_PROGRAM_ID,
            source=source,
            mint=NATIVE_MINT,
            dest=dest,
            owner=owner,
            amount=amount,
            decimals=NATIVE_DECIMALS,
            signers=list(signers),
        )
    )


def close_wsol(
    *, account: Pubkey, dest: Pubkey, owner: Pubkey, signers: Sequence[Pubkey] = ()
) -> Instruction:
    """Close the wSOL ``account`` (its owner ``owner``, with multisig co-signers
    ``signers``): every lamport it holds goes to ``dest``."""
    return close_account(
        CloseAccountParams(
            program_id=TOKEN_PROGRAM_ID,
            account=account,
            dest=dest,
            owner=owner,
            signers=list(signers),
        )
    )


def pay_sol(payer: Pubkey, to: Pubkey, lamports: int) -> Instruction:
    """A System transfer of ``lamports`` from ``payer`` to ``to``."""
    return transfer(TransferParams(from_pubkey=payer, to_pubkey=to, lamports=lamports))


def transfer_amounts(message: MessageV0) -> set[int]:
    """The amounts of every TransferChecked and System transfer in ``message`` (by their
    data alone), plus 0: the candidates a party tries when it rebuilds a message it is asked
    to sign around an amount it cannot know in advance."""
    amounts = {0}
    for ix in message.instructions:
        data = bytes(ix.data)
        if len(data) == 10 and data[0] == TRANSFER_CHECKED_TAG:
            amounts.add(int.from_bytes(data[1:9], "little"))
        elif len(data) == 12 and data[:4] == SYSTEM_TRANSFER_TAG:
            amounts.add(int.from_bytes(data[4:12], "little"))
    return amounts
