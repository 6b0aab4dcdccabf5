"""Credentials as PowerShell scripts build them: Get-Credential, ConvertTo-SecureString,
New-Object System.Management.Automation.PSCredential(...)."""

from __future__ import annotations

from typing import Any

from mailgate.config.model import Credential
from mailgate.errors import InvalidValueError, UserError
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.params import as_list, scalar, to_str
from mailgate.manage.present import custom_object


class SecureString:
    """A password that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "System.Security.SecureString"

    __repr__ = __str__


class PSCredential:
    type_name = "System.Management.Automation.PSCredential"
    property_names = ("UserName", "Password")

    def __init__(self, user_name: str, password: SecureString) -> None:
        if not user_name:
            raise InvalidValueError("A credential needs a user name.", parameter="UserName")
        self.user_name = user_name
        self.password = password

    def get(self, name: str, default: Any = None) -> Any:
        return {"username": self.user_name, "password": self.password}.get(name.lower(), default)

    def __str__(self) -> str:
        return self.type_name


def to_credential(value: Any) -> PSCredential:
    """A PSCredential from the shell, or {"UserName": ..., "Password": ...} from JSON."""
    value = scalar(value)
    if isinstance(value, PSCredential):
        return value
    if isinstance(value, dict):
        keys = {k.lower(): v for k, v in value.items()}
        if "username" in keys and "password" in keys:
            pw = keys["password"]
            return PSCredential(str(keys["username"]), pw if isinstance(pw, SecureString) else SecureString(str(pw)))
    raise ValueError('Cannot convert the value to type "System.Management.Automation.PSCredential"; '
                     "use (Get-Credential) or New-Object System.Management.Automation.PSCredential(user, password)")


def store_credential(ctx: ManagementContext, cred: PSCredential) -> Credential:
    return Credential(user_name=cred.user_name, encrypted_password=ctx.secrets.encrypt(cred.password.reveal()))


def reveal_credential(secrets: Any, cred: Credential) -> tuple[str, str]:
    return cred.user_name, secrets.decrypt(cred.encrypted_password).decode("utf-8")


@cmdlet("Get-Credential",
        [Param("Credential", position=0, convert=to_str, aliases=("UserName",), help="The user name to prefill."),
         Param("Message", convert=to_str, help="Text shown above the prompt.")],
        synopsis="Ask for a user name and password.", builtin=True)
def get_credential(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Prompt for a user name and password (on the terminal, or from standard input in scripts)."""
    if ctx.prompter is None:
        raise UserError("Get-Credential needs a terminal or standard input to ask for the user name and password; "
                        "over the REST API pass the credential as {\"UserName\": ..., \"Password\": ...}.")
    ctx.prompter.notice("PowerShell credential request\n" + (args.get("Message") or "Enter your credentials."))
    user = args.get("Credential") or ctx.prompter.ask("User: ")
    if not user:
        raise UserError("Get-Credential: no user name was entered.")
    password = ctx.prompter.ask(f"Password for user {user}: ", secret=True)
    return [PSCredential(user, SecureString(password))]


@cmdlet("Read-Host", [Param("Prompt", position=0, convert=to_str), Param("AsSecureString", switch=True)],
        synopsis="Ask the person at the shell for a line of text (or a password with -AsSecureString).", builtin=True)
def read_host(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """The line typed (on the terminal, or from standard input in scripts); "Prompt: " shown first."""
    if ctx.prompter is None:
        raise UserError("Read-Host needs a terminal or standard input to ask on.")
    prompt = f"{args['Prompt']}: " if args.get("Prompt") else ""
    line = ctx.prompter.ask(prompt, secret=bool(args.get("AsSecureString")))
    return [SecureString(line) if args.get("AsSecureString") else line]


@cmdlet("ConvertTo-SecureString",
        [Param("String", position=0, mandatory=True, convert=to_str),
         Param("AsPlainText", switch=True), Param("Force", switch=True)],
        synopsis="Make a SecureString from plain text.", builtin=True)
def convertto_securestring(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Convert plain text to a SecureString (needs -AsPlainText -Force, as in PowerShell)."""
    if not (args.get("AsPlainText") and args.get("Force")):
        raise UserError("ConvertTo-SecureString: converting plain text needs both -AsPlainText and -Force.",
                        parameter="AsPlainText")
    return [SecureString(args["String"])]


_PSCREDENTIAL_NAMES = {"system.management.automation.pscredential", "pscredential",
                       "management.automation.pscredential"}


_PSOBJECT_NAMES = {"psobject", "pscustomobject", "system.management.automation.psobject",
                   "system.management.automation.pscustomobject"}


@cmdlet("New-Object",
        [Param("TypeName", position=0, mandatory=True, convert=to_str),
         Param("ArgumentList", position=1, aliases=("Args",), raw=True),
         Param("Property", raw=True, help="PSObject: its properties, from a hashtable.")],
        synopsis="Create an object (PSCredential, or a PSObject with -Property).", builtin=True)
def new_object(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Create a PSCredential from a user name and a SecureString, or a PSObject from -Property's hashtable."""
    type_name = args["TypeName"].lower()
    if type_name in _PSOBJECT_NAMES:
        props = args.get("Property")
        if props is not None and not isinstance(props, dict):
            raise UserError("-Property takes a hashtable: @{Name = value; ...}.", parameter="Property")
        return [custom_object(props or {})]
    if type_name not in _PSCREDENTIAL_NAMES:
        raise UserError(f'Cannot find type [{args["TypeName"]}]: mailgate\'s New-Object creates '
                        "System.Management.Automation.PSCredential and PSObject only.", parameter="TypeName")
    values = as_list(args.get("ArgumentList"))
    if len(values) != 2:
        raise UserError('A PSCredential needs two arguments: the user name and the password '
                        '(ConvertTo-SecureString "..." -AsPlainText -Force).', parameter="ArgumentList")
    user, password = values
    if not isinstance(password, SecureString):
        raise UserError('Cannot convert argument "password" to type "System.Security.SecureString"; make it with '
                        'ConvertTo-SecureString "..." -AsPlainText -Force.', parameter="ArgumentList")
    return [PSCredential(to_str(user), password)]


