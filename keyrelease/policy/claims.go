package policy

import (
	"fmt"
	"strconv"
	"strings"
)

// Claim value types of SevSnpVm tokens.
const (
	TypeString = "string"
	TypeBool   = "bool"
	TypeNumber = "number"
)

// SevSnpVmClaimTypes are the JSON types MAA gives SevSnpVm claims (the
// claim set of a real SevSnpVm token). A claim not listed is a string:
// hex claims such as x-ms-sevsnpvm-familyId or an all-zero digest look
// like numbers but must stay strings, or the policy can never match.
var sevSnpVmClaimTypes = map[string]string{
	"x-ms-sevsnpvm-is-debuggable":     TypeBool,
	"x-ms-sevsnpvm-smt-allowed":       TypeBool,
	"x-ms-sevsnpvm-migration-allowed": TypeBool,
	"x-ms-sevsnpvm-vmpl":              TypeNumber,
	"x-ms-sevsnpvm-guestsvn":          TypeNumber,
	"x-ms-sevsnpvm-bootloader-svn":    TypeNumber,
	"x-ms-sevsnpvm-tee-svn":           TypeNumber,
	"x-ms-sevsnpvm-snpfw-svn":         TypeNumber,
	"x-ms-sevsnpvm-microcode-svn":     TypeNumber,
	"x-ms-sevsnpvm-abiminor":          TypeNumber,
	"x-ms-sevsnpvm-abimajor":          TypeNumber,
	"x-ms-sevsnpvm-policy-abi-major":  TypeNumber,
	"x-ms-sevsnpvm-policy-abi-minor":  TypeNumber,
	"x-ms-sevsnpvm-reportid":          TypeString,
	"x-ms-sevsnpvm-familyId":          TypeString,
	"x-ms-sevsnpvm-imageId":           TypeString,
	"x-ms-sevsnpvm-hostdata":          TypeString,
	"x-ms-sevsnpvm-launchmeasurement": TypeString,
	"x-ms-sevsnpvm-idkeydigest":       TypeString,
	"x-ms-sevsnpvm-authorkeydigest":   TypeString,
	"x-ms-sevsnpvm-reportdata":        TypeString,
	"x-ms-sevsnpvm-chipid":            TypeString,
	"x-ms-attestation-type":           TypeString,
	"x-ms-compliance-status":          TypeString,
	"x-ms-ver":                        TypeString,
}

// ClaimType is the JSON type of a SevSnpVm claim: bool, number, or string
// (the default for names MAA does not type otherwise).
func ClaimType(name string) string {
	if t, ok := sevSnpVmClaimTypes[name]; ok {
		return t
	}
	return TypeString
}

// ParseClaim reads a claim given on a command line as NAME=VALUE or, to
// force a type, NAME:TYPE=VALUE (TYPE string, bool or number). Without a
// type the value takes the claim's known type (ClaimType), so a hex value
// of digits stays a string.
func ParseClaim(arg string) (Claim, error) {
	nameType, value, ok := strings.Cut(arg, "=")
	if !ok || nameType == "" {
		return Claim{}, fmt.Errorf("claim %q must be NAME=VALUE or NAME:TYPE=VALUE", arg)
	}
	name, typ, typed := strings.Cut(nameType, ":")
	if name == "" {
		return Claim{}, fmt.Errorf("claim %q has an empty name", arg)
	}
	if !typed {
		typ = ClaimType(name)
	}
	v, err := ClaimValue(typ, value)
	if err != nil {
		return Claim{}, fmt.Errorf("claim %s: %w", name, err)
	}
	return Claim{Name: name, Value: v}, nil
}

// ClaimValue converts s to typ.
func ClaimValue(typ, s string) (any, error) {
	switch typ {
	case TypeString:
		return s, nil
	case TypeBool:
		b, err := strconv.ParseBool(s)
		if err != nil || (s != "true" && s != "false") {
			return nil, fmt.Errorf("value %q is not true or false", s)
		}
		return b, nil
	case TypeNumber:
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return nil, fmt.Errorf("value %q is not a number", s)
		}
		return f, nil
	}
	return nil, fmt.Errorf("type %q is not string, bool or number", typ)
}

// SevSnpVmOptions are the release-policy requirements for a blobseal key.
type SevSnpVmOptions struct {
	HostData         string // 64 hex digits: SHA-256 of the CCE policy
	AllowDebug       bool   // omit x-ms-sevsnpvm-is-debuggable=false (never for production)
	ComplianceStatus string // e.g. azure-compliant-uvm; "" to omit
	Extra            []Claim
}

// SevSnpVmClaims lists the claims a key's release policy requires: a
// SevSnpVm attestation of exactly this container group (HOST_DATA), not
// debuggable, plus extras.
func SevSnpVmClaims(o SevSnpVmOptions) ([]Claim, error) {
	hd := strings.ToLower(strings.TrimSpace(o.HostData))
	if len(hd) != 64 || strings.Trim(hd, "0123456789abcdef") != "" {
		return nil, fmt.Errorf("host data must be 64 hex digits (the SHA-256 of the CCE policy), got %q", o.HostData)
	}
	list := []Claim{
		{Name: "x-ms-attestation-type", Value: "sevsnpvm"},
		{Name: "x-ms-sevsnpvm-hostdata", Value: hd},
	}
	if !o.AllowDebug {
		list = append(list, Claim{Name: "x-ms-sevsnpvm-is-debuggable", Value: false})
	}
	if o.ComplianceStatus != "" {
		list = append(list, Claim{Name: "x-ms-compliance-status", Value: o.ComplianceStatus})
	}
	return append(list, o.Extra...), nil
}
