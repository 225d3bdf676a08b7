// Package azcred is blobseal's one Entra ID credential chain, for storage
// and for the vault: workload identity (AKS, when AZURE_FEDERATED_TOKEN_FILE
// is set), then managed identity (ACI, VMs), then, for tooling only, the
// Azure CLI login.
package azcred

import (
	"errors"
	"fmt"
	"os"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
)

// Options select the identities in the chain.
type Options struct {
	// ManagedIdentityClientID picks a user-assigned managed identity (and
	// the workload identity's client).
	ManagedIdentityClientID string
	// AllowCLI adds the Azure CLI login last (a workstation; never the
	// sidecar).
	AllowCLI bool
}

// New builds the chain. It fails only when no identity can be constructed
// at all; whether one yields a token shows at the first request.
func New(o Options) (azcore.TokenCredential, error) {
	var chain []azcore.TokenCredential
	var errs []error
	if os.Getenv("AZURE_FEDERATED_TOKEN_FILE") != "" {
		wi, err := azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{ClientID: o.ManagedIdentityClientID})
		if err != nil {
			errs = append(errs, fmt.Errorf("workload identity: %w", err))
		} else {
			chain = append(chain, wi)
		}
	}
	miOpts := &azidentity.ManagedIdentityCredentialOptions{}
	if o.ManagedIdentityClientID != "" {
		miOpts.ID = azidentity.ClientID(o.ManagedIdentityClientID)
	}
	if mi, err := azidentity.NewManagedIdentityCredential(miOpts); err != nil {
		errs = append(errs, fmt.Errorf("managed identity: %w", err))
	} else {
		chain = append(chain, mi)
	}
	if o.AllowCLI {
		if cli, err := azidentity.NewAzureCLICredential(nil); err != nil {
			errs = append(errs, fmt.Errorf("Azure CLI: %w", err))
		} else {
			chain = append(chain, cli)
		}
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("no Azure identity available (managed identity, workload identity%s): %w", map[bool]string{true: ", Azure CLI"}[o.AllowCLI], errors.Join(errs...))
	}
	return azidentity.NewChainedTokenCredential(chain, nil)
}
