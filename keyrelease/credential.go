package keyrelease

import (
	"fmt"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/hsm"
)

// CredentialOptions choose how blobseal authenticates to the vault.
type CredentialOptions struct {
	// Bearer, when set, is used as is (akv.bearer_token of the existing
	// sidecar's configuration).
	Bearer secret.Token
	// ManagedIdentityClientID selects a user-assigned managed identity.
	ManagedIdentityClientID string
	// AllowCLI adds the Azure CLI login (tooling on a workstation; never
	// in the sidecar).
	AllowCLI bool
}

// NewCredential returns the vault credential: the given bearer token, else
// workload identity (AKS), then managed identity (ACI, VMs), then, for
// tooling, the Azure CLI.
func NewCredential(o CredentialOptions) (azcore.TokenCredential, error) {
	if o.Bearer != "" {
		return hsm.BearerToken(o.Bearer), nil
	}
	var chain []azcore.TokenCredential
	if wi, err := azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{ClientID: o.ManagedIdentityClientID}); err == nil {
		chain = append(chain, wi) // only when AZURE_FEDERATED_TOKEN_FILE etc. are set
	}
	miOpts := &azidentity.ManagedIdentityCredentialOptions{}
	if o.ManagedIdentityClientID != "" {
		miOpts.ID = azidentity.ClientID(o.ManagedIdentityClientID)
	}
	mi, err := azidentity.NewManagedIdentityCredential(miOpts)
	if err != nil {
		return nil, fmt.Errorf("managed identity credential: %w", err)
	}
	chain = append(chain, mi)
	if o.AllowCLI {
		cli, err := azidentity.NewAzureCLICredential(nil)
		if err != nil {
			return nil, fmt.Errorf("Azure CLI credential: %w", err)
		}
		chain = append(chain, cli)
	}
	cred, err := azidentity.NewChainedTokenCredential(chain, nil)
	if err != nil {
		return nil, fmt.Errorf("vault credential: %w", err)
	}
	return cred, nil
}
